"""The file layer every path of a run goes through: a local path, or a URL such as
gs://bucket/run (Cloud Storage, through fsspec's gcsfs: `pip install -e '.[gcs]'`).

A local path keeps its POSIX meaning (os, open, atomic renames). A URL goes to its fsspec
filesystem, where a directory is a key prefix (it exists once a file is under it), a rename is a
copy then a delete, and a file is in place when it is closed (an object upload is all or nothing).
orbax and TensorStore take gs:// paths themselves. What reads local files only (SentencePiece,
safetensors, arrow memory maps) gets `local(path)`: the file or directory downloaded once per
process. A URL's filesystem lists its directories afresh on every call: checkpoints are written by
TensorStore, behind gcsfs's back.

The emulator of tests/test_gcs.py is reached through STORAGE_EMULATOR_HOST (gcsfs) and
TENSORSTORE_GCS_HTTP_URL (TensorStore).
"""
import atexit
import builtins
import os
import shutil
import tempfile
import time


def is_url(path) -> bool:
  return "://" in str(path)


def _fs(url: str):
  """The fsspec filesystem of `url` (one instance per protocol, listings never cached)."""
  import fsspec
  return fsspec.filesystem(url.split("://", 1)[0], use_listings_cache=False)


def _url(url: str, key: str) -> str:
  """A key an fsspec listing returns ("bucket/a/b") as a URL of `url`'s protocol."""
  protocol = url.split("://", 1)[0] + "://"
  return key if key.startswith(protocol) else protocol + key


def absolute(path: str) -> str:
  """A local path made absolute (~ expanded); a URL as it is."""
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def exists(path: str) -> bool:
  return _fs(path).exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _fs(path).isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _fs(path).isfile(path) if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list:
  """The names in a directory (none when it does not exist, for a URL)."""
  if not is_url(path):
    return os.listdir(path)
  if not isdir(path):
    return []
  return [k.rstrip("/").rsplit("/", 1)[-1] for k in _fs(path).ls(path, detail=False)
          if k.rstrip("/") != path.split("://", 1)[1].rstrip("/")]


def makedirs(path: str) -> None:
  """os.makedirs(exist_ok=True); nothing for a URL (its directories are key prefixes)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def open(path: str, mode: str = "r", **kwargs):  # noqa: A001  (the layer's open)
  """open() of a local path; the fsspec file of a URL (text modes decode UTF-8)."""
  if not is_url(path):
    return builtins.open(path, mode, **kwargs)
  if "b" not in mode:
    kwargs.setdefault("encoding", "utf-8")
  return _fs(path).open(path, mode, **kwargs)


def stat(path: str) -> tuple:
  """(size in bytes, a version that changes when the file is rewritten): the modification time in
  ns; for a URL the object's generation (or update time)."""
  if not is_url(path):
    s = os.stat(path)
    return s.st_size, s.st_mtime_ns
  info = _fs(path).info(path)
  return int(info["size"]), str(info.get("generation") or info.get("updated") or info.get("mtime") or "")


def getsize(path: str) -> int:
  return stat(path)[0]


def files_under(path: str) -> list:
  """Every file under directory `path`, as sorted paths relative to it."""
  if not is_url(path):
    out = []
    for root, _, names in os.walk(path):
      out += [os.path.relpath(os.path.join(root, n), path) for n in names]
    return sorted(out)
  prefix = path.split("://", 1)[1].rstrip("/") + "/"
  return sorted(k[len(prefix):] for k in _fs(path).find(path) if k.startswith(prefix))


def glob(pattern: str) -> list:
  """The paths a glob matches, sorted (~ expanded for a local pattern)."""
  if not is_url(pattern):
    import glob as glob_lib
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  return sorted(_url(pattern, k) for k in _fs(pattern).glob(pattern))


def copyfile(src: str, dst: str) -> None:
  """Copies one file between any two places (local or URL)."""
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 24)


def rename(src: str, dst: str) -> None:
  """os.rename of a file or directory; for a URL every file is copied, then the source deleted."""
  if not is_url(src):
    os.rename(src, dst)
    return
  fs = _fs(src)
  if not fs.isdir(src):
    fs.copy(src, dst)
  else:
    for rel in files_under(src):
      fs.copy(f"{src.rstrip('/')}/{rel}", f"{dst.rstrip('/')}/{rel}")
  fs.rm(src, recursive=True)


def rmtree(path: str) -> None:
  """Deletes a directory and everything under it, if it exists."""
  if not is_url(path):
    shutil.rmtree(path, ignore_errors=True)
  elif exists(path):
    _fs(path).rm(path, recursive=True)


def remove(path: str) -> None:
  """Deletes a file, if it exists."""
  if not is_url(path):
    if os.path.exists(path):
      os.remove(path)
  elif exists(path):
    _fs(path).rm(path)


def write_atomic(path: str, data) -> None:
  """Writes `data` (str or bytes) to `path` so that a reader sees all of it or none: a local file
  through a synced temporary and a rename; a URL by one upload."""
  mode = "w" if isinstance(data, str) else "wb"
  if is_url(path):
    with open(path, mode) as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp.")
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def create_new(path: str, text: str) -> bool:
  """Writes `text` to `path` only if nothing is there (a URL: an upload conditional on the object
  not existing, if-generation-match=0); False when something was."""
  if exists(path):
    return False
  if not is_url(path):
    try:
      with builtins.open(path, "x") as f:
        f.write(text)
    except FileExistsError:
      return False
    return True
  try:
    with _fs(path).open(path, "xb") as f:
      f.write(text.encode())
  except FileExistsError:
    return False
  return True


def upload(local_dir: str, dst: str) -> None:
  """Copies every file of local directory `local_dir` under `dst` (a local path or a URL)."""
  _local_copies.pop(dst.rstrip("/"), None)
  for rel in files_under(local_dir):
    target = os.path.join(dst, rel)
    makedirs(os.path.dirname(target))
    copyfile(os.path.join(local_dir, rel), target)


def replace_dir(local_dir: str, dst: str) -> None:
  """Directory `dst` becomes local directory `local_dir` (moved: `local_dir` is gone after). A local
  `dst` is swapped by renames (on the same filesystem as `local_dir`); a URL's is deleted, then
  uploaded."""
  if is_url(dst):
    _local_copies.pop(dst.rstrip("/"), None)
    rmtree(dst)
    upload(local_dir, dst)
    shutil.rmtree(local_dir, ignore_errors=True)
    return
  aside = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dst)), prefix=".old.")
  try:
    if os.path.isdir(dst):
      os.replace(dst, aside)
    os.rename(local_dir, dst)
  finally:
    shutil.rmtree(aside, ignore_errors=True)


_local_copies = {}


def local(path: str) -> str:
  """A local path holding `path`'s file or directory: `path` itself, or for a URL a copy
  downloaded the first time it is asked for and deleted when the process exits."""
  if not is_url(path):
    return os.path.expanduser(path)
  path = path.rstrip("/")
  if path not in _local_copies:
    root = tempfile.mkdtemp(prefix="kiln-remote-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = os.path.join(root, path.rsplit("/", 1)[-1])
    if isdir(path):
      os.makedirs(out)
      for rel in files_under(path):
        os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
        copyfile(f"{path}/{rel}", os.path.join(out, rel))
    elif exists(path):
      copyfile(path, out)
    else:
      return path  # absent: the caller's own check names it
    _local_copies[path] = out
  return _local_copies[path]


class Appender:
  """A file appended to line by line (metrics.jsonl, samples.jsonl): a local file opened in "a"
  mode; a URL (objects cannot be appended to) is read once, kept in memory, and uploaded whole at
  most every `every_s` seconds on flush, and on close."""

  def __init__(self, path: str, every_s: float = 30.0):
    self.path, self.every_s = path, every_s
    if not is_url(path):
      self.f = builtins.open(path, "a")
      return
    self.f = None
    self.parts = [open(path).read()] if exists(path) else []
    self.uploaded = time.monotonic()
    self.dirty = False

  def write(self, text: str) -> None:
    if self.f is not None:
      self.f.write(text)
    else:
      self.parts.append(text)
      self.dirty = True

  def flush(self, force: bool = False) -> None:
    if self.f is not None:
      self.f.flush()
    elif self.dirty and (force or time.monotonic() - self.uploaded >= self.every_s):
      with open(self.path, "w") as f:
        f.write("".join(self.parts))
      self.uploaded, self.dirty = time.monotonic(), False

  def close(self) -> None:
    if self.f is not None:
      self.f.close()
    else:
      self.flush(force=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
