"""Records of data files in the formats researchers already have, one reader per format, each
yielding (where, record dict) with `where` naming the file and row for errors:

- "jsonl": one JSON object per line; where = "path:line" (1-based, blank lines skipped).
- "parquet": one record per row, read a batch of rows at a time; where = "path:row i" (0-based).
- "hf_disk": a Hugging Face `datasets` directory written by `Dataset.save_to_disk` (state.json
  names its arrow shards, read in order, a batch at a time); where = "dir:row i" (0-based, as
  `ds[i]`). A `DatasetDict` directory holds one such directory per split: name the split's.

parquet and hf_disk are read with pyarrow (the `arrow` extra: `pip install -e '.[arrow]'`),
imported only when such a file is read; no `datasets` import. Their nulls are missing keys (a
column that only some records fill, as in a JSONL file). A list of structs reads back as a list
of dicts, so a conversation column is [{"role", "content"}, ...] in every format.

`records(fmt, pattern)` reads every file a glob matches in sorted order; `stats` is what a cache
key of those files depends on; `messages` checks a conversation field of a record. What the
records mean is the reader's business: train/sources.py (pretraining text, SFT conversations),
train/pairs.py (preference pairs), rl/prompts.py (RL prompts).
"""
import json
import os

from configs.errors import UserError
from model import tokenizer as tokenizer_lib
from train import files as file_layer

FORMATS = ("jsonl", "parquet", "hf_disk")
BATCH_ROWS = 1024  # parquet / arrow rows decoded to Python at a time


def files(pattern: str, key: str) -> list[str]:
  """The paths a glob matches, sorted; none is a UserError naming config.`key` ("data.path")."""
  found = file_layer.glob(pattern) if pattern else []
  if not found:
    raise UserError(f"config.{key}={pattern!r} matches no file")
  return found


def detect(path: str) -> str:
  """The format of one path: a directory is hf_disk, *.parquet parquet, anything else jsonl."""
  if file_layer.isdir(path):
    return "hf_disk"
  return "parquet" if path.endswith(".parquet") else "jsonl"


def read(fmt: str, path: str):
  """Yields (where, record) of one file (a directory for hf_disk) in format `fmt`."""
  readers = {"jsonl": jsonl_records, "parquet": parquet_records, "hf_disk": hf_disk_records}
  if fmt not in readers:
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
  return readers[fmt](path)


def records(fmt: str, pattern: str, key: str = "data.path"):
  """Yields (where, record) of every file matching `pattern` (config.`key`), in sorted order."""
  for path in files(pattern, key):
    yield from read(fmt, path)


def stats(path: str) -> list:
  """[(absolute path, size, mtime_ns)] of the files holding a data set's records: changes whenever
  one is rewritten (an hf_disk directory: its state.json and arrow shards)."""
  paths = [path]
  if file_layer.isdir(path):
    paths = [os.path.join(path, "state.json")] + [os.path.join(path, f) for f in _hf_shards(path)]
  return [(file_layer.absolute(p), *file_layer.stat(p)) for p in paths]


# ----------------------------------------------------------------------------- jsonl


def utf8_lines(path: str):
  """Yields (line number, line) of a UTF-8 text file; a byte that is not UTF-8 raises UserError
  naming the file, the line and the byte's offset. Every reader of text and JSONL files uses it."""
  with file_layer.open(path, encoding="utf-8") as f:
    try:
      yield from enumerate(f, 1)
    except UnicodeDecodeError:
      raise _not_utf8(path) from None


def _not_utf8(path: str) -> UserError:
  """The error of the first line of `path` that does not decode (read again, as bytes)."""
  offset = 0
  with file_layer.open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError as e:
        return UserError(f"{path}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}, "
                         f"byte offset {offset + e.start} of the file)",
                         hint="save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`")
      offset += len(raw)
  return UserError(f"{path}: not UTF-8 (a multi-byte character is cut at the end of the file)",
                   hint="save the file as UTF-8")


def jsonl_records(path: str):
  """Yields ("path:line", parsed object) for every non-empty line of a JSONL file; a line that
  is not JSON (or not UTF-8) raises UserError naming the file and line."""
  for n, line in utf8_lines(path):
    if not line.strip():
      continue
    yield f"{path}:{n}", parse_json(line, f"{path}:{n}")


def parse_json(line: str, where: str):
  """One JSONL line parsed; not JSON raises UserError naming `where` ("path:line")."""
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})",
                    hint="a JSONL file holds one JSON object per line") from None


# ----------------------------------------------------------------------------- arrow


def _pyarrow():
  """pyarrow, imported where a parquet file or an hf_disk directory is read."""
  try:
    import pyarrow
    import pyarrow.parquet  # noqa: F401  (the submodule, as pyarrow.parquet)
  except ImportError:
    raise UserError("reading parquet or a datasets save_to_disk directory needs pyarrow",
                    hint="pip install -e '.[arrow]'") from None
  return pyarrow


def _rows(batches, name: str):
  """Yields ("name:row i", record) of Arrow record batches, nulls left out."""
  i = 0
  for batch in batches:
    for row in batch.to_pylist():
      yield f"{name}:row {i}", {k: v for k, v in row.items() if v is not None}
      i += 1


def parquet_records(path: str):
  """Yields ("path:row i", record) of a parquet file, BATCH_ROWS rows decoded at a time."""
  pa = _pyarrow()
  try:
    f = pa.parquet.ParquetFile(file_layer.open(path, "rb") if file_layer.is_url(path) else path)
  except (pa.ArrowInvalid, OSError) as e:
    raise UserError(f"{path}: not a parquet file ({e})") from None
  with f:
    yield from _rows(f.iter_batches(batch_size=BATCH_ROWS), path)


def _hf_shards(path: str) -> list[str]:
  """The arrow files of a save_to_disk directory, in row order (its state.json's `_data_files`)."""
  state = os.path.join(path, "state.json")
  if not file_layer.isfile(state):
    splits = os.path.join(path, "dataset_dict.json")
    if file_layer.isfile(splits):
      with file_layer.open(splits) as f:
        names = json.load(f).get("splits", [])
      raise UserError(f"{path} is a DatasetDict: name one split's directory",
                      hint=" or ".join(os.path.join(path, s) for s in names))
    raise UserError(f"{path}: no state.json: not a directory written by datasets' save_to_disk")
  with file_layer.open(state) as f:
    return [d["filename"] for d in json.load(f)["_data_files"]]


def hf_disk_records(path: str):
  """Yields ("dir:row i", record) of a `Dataset.save_to_disk` directory, row i counted across its
  arrow shards (i is the row's index in the saved dataset)."""
  pa = _pyarrow()

  def batches():
    for name in _hf_shards(path):
      with pa.memory_map(file_layer.local(os.path.join(path, name))) as source:  # gs://: downloaded
        yield from pa.ipc.open_stream(source)

  yield from _rows(batches(), path.rstrip("/"))


# ----------------------------------------------------------------------------- conversations


def messages(value, where: str, key: str = "messages") -> list[dict]:
  """A record's conversation field checked and copied as [{"role", "content"}, ...] (other keys
  dropped); UserError names `where` and `key`."""
  if not isinstance(value, list) or not value:
    raise UserError(f"{where}: {key!r} must be a non-empty list of messages")
  for i, m in enumerate(value):
    if not isinstance(m, dict) or m.get("role") not in tokenizer_lib.ROLES or not isinstance(m.get("content"), str):
      raise UserError(f"{where}: {key!r} message {i} needs a role in {tokenizer_lib.ROLES} and a "
                      f"string 'content', got {m!r}")
  return [{"role": m["role"], "content": m["content"]} for m in value]
