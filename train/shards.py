"""One process's shard of the records of data files, read from where it left off (train/stream.py).

The records of a split are numbered r = 0, 1, ... across the files of `data.path` in sorted order,
as train/sources.py and train/pairs.py read them (at most `data.max_documents`); without an eval
file, records with r % 50 == 0 are held out. The j-th record of a split is raw record `raw_index(j)`
and shard p of P holds the split's records p, p + P, p + 2P, ...

`records(fmt, paths, targets, seek)` yields (where, record, after) for the raw records `targets`
(increasing), one reader per kind of file, so that a process decodes only its own records:
- "jsonl", "text" (read in order): lines are scanned as bytes from the byte offset `seek`, and only
  target lines are decoded as JSON (text: paragraphs, blank-line separated). `after` = (file, byte,
  line): where the scan goes on after the record; a resumed stream seeks there instead of reading
  the files again from the start. Lines end with "\\n" (or "\\r\\n", read as "\\n").
- "parquet": only row groups holding targets are read, and only the targets' rows become Python.
- "hf_disk" (`save_to_disk` arrow shards, memory-mapped): only the targets' rows become Python.
  Random access: `seek` is not needed and `after` is (file, row, 0), for the record only.
A record is what train/formats.py reads (text: {"text": paragraph}), `where` names it alike
("path:line", "path:row i"; a paragraph: "path:its first line").
"""
import os

from configs.errors import UserError
from train import files, formats

EVAL_EVERY = 50  # without an eval file, records with index % 50 == 0 are held out
START = (0, 0, 1)  # the seek of the first record: file 0, byte 0, line 1
NO_SEEK = (-1, 0, 0)  # scan from the start (a state saved before seeks existed)


def raw_index(j: int, split: str, held_out: bool) -> int:
  """The raw record number of the j-th record of a split (with a hold-out: train skips r % 50 == 0)."""
  if not held_out:
    return j
  if split == "eval":
    return j * EVAL_EVERY
  return j + j // (EVAL_EVERY - 1) + 1


def records(fmt: str, paths: list[str], targets, seek=NO_SEEK, first: int = 0):
  """Yields (where, record, after) of the raw records `targets` (an increasing iterator) of `paths`.
  Sequential readers start at `seek` (file, byte, line), which is raw record `first`."""
  if fmt in ("jsonl", "text"):
    if seek[0] < 0:
      seek, first = START, 0
    return _lines(fmt, paths, targets, seek, first)
  readers = {"parquet": _parquet, "hf_disk": _hf_disk}
  if fmt not in readers:
    raise ValueError(f"unknown data format {fmt!r}")
  return readers[fmt](paths, targets)


# ----------------------------------------------------------------------------- jsonl, text


def _decode(raw: bytes, path: str) -> str:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    raise formats._not_utf8(path) from None
  return text[:-2] + "\n" if text.endswith("\r\n") else text


def _lines(fmt: str, paths: list[str], targets, seek: tuple, r: int):
  """Raw record r is the first record at or after `seek`; a record is a line (jsonl) or a paragraph
  (text: non-blank lines, the first one after a blank line or a file's start)."""
  want = next(targets, None)
  file, byte, line = seek
  while want is not None and file < len(paths):
    path = paths[file]
    para, end = None, None  # a paragraph's lines (False: not a target's) and first line; where it ends
    with files.open(path, "rb") as f:
      f.seek(byte)
      for raw in iter(f.readline, b""):
        text, n = _decode(raw, path), line
        byte, line = byte + len(raw), line + 1
        if fmt == "jsonl":
          if text.strip():
            if r == want:
              where = f"{path}:{n}"
              yield where, formats.parse_json(text, where), (file, byte, line)
              want = next(targets, None)
              if want is None:
                return
            r += 1
        elif text.strip():  # text: a line of a paragraph
          if para is None:
            para, start = ([] if r == want else False), n
          if para is not False:
            para.append(text)
          end = (file, byte, line)
        elif para is not None:  # a blank line ends a paragraph
          if para is not False:
            yield f"{path}:{start}", {"text": "".join(para).strip()}, end
            want = next(targets, None)
            if want is None:
              return
          r, para = r + 1, None
    if para:
      yield f"{path}:{start}", {"text": "".join(para).strip()}, end
      want = next(targets, None)
    if para is not None:
      r += 1
    file, byte, line = file + 1, 0, 1


# ----------------------------------------------------------------------------- arrow


def _take(batch, local: list[int]) -> list[dict]:
  """Rows `local` of an Arrow table or record batch as records, nulls left out."""
  return [{k: v for k, v in row.items() if v is not None} for row in batch.take(local).to_pylist()]


def _targets_below(targets, want, end: int, offset: int):
  """(local indices of the targets below `end`, the next target): targets minus `offset`."""
  local = []
  while want is not None and want < end:
    local.append(want - offset)
    want = next(targets, None)
  return local, want


def _parquet(paths: list[str], targets):
  pa = formats._pyarrow()
  want, offset = next(targets, None), 0  # raw number of the file's first row
  for file, path in enumerate(paths):
    if want is None:
      return
    try:
      f = pa.parquet.ParquetFile(files.open(path, "rb") if files.is_url(path) else path)
    except (pa.ArrowInvalid, OSError) as e:
      raise UserError(f"{path}: not a parquet file ({e})") from None
    with f:
      first = offset  # the file's first raw record
      for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        local, want = _targets_below(targets, want, offset + n, offset)
        if local:
          for i, rec in zip(local, _take(f.read_row_group(g), local)):
            row = offset + i - first
            yield f"{path}:row {row}", rec, (file, row, 0)
        offset += n


def _hf_disk(paths: list[str], targets):
  pa = formats._pyarrow()
  want, offset = next(targets, None), 0
  for file, path in enumerate(paths):
    first, name = offset, path.rstrip("/")
    for shard in formats._hf_shards(path):
      if want is None:
        return
      with pa.memory_map(files.local(os.path.join(path, shard))) as source:  # gs://: downloaded
        for batch in pa.ipc.open_stream(source):  # zero-copy: rows not taken are never decoded
          n = batch.num_rows
          local, want = _targets_below(targets, want, offset + n, offset)
          for i, rec in zip(local, _take(batch, local) if local else []):
            row = offset + i - first
            yield f"{name}:row {row}", rec, (file, row, 0)
          offset += n
          if want is None:
            return
