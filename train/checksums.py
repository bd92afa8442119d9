"""Checksums of a committed checkpoint step, checked before it is restored; a bad step is moved aside.

    DIR/checkpoints/<step>/kiln_checksums.json  {"crc32": {path in the step: [bytes, crc32]}},
                                                written by process 0 once orbax has committed the step
    DIR/checkpoints-corrupt/<step>-<reason>/    a step that failed its check or did not restore
                                                (moved out of the folder orbax scans, never deleted)

A step without the file (saved before checksums existed, or the process died between orbax's commit
and the file) is "unverified": it is used if it restores. CRC32 catches truncation, flipped bytes
and missing files; it reads every byte once (about a second per GB).
"""
import json
import os
import zlib

from train import files

FILE = "kiln_checksums.json"
OK, UNVERIFIED = "ok", "unverified"
_BLOCK = 1 << 24


def _crc32(path: str) -> int:
  crc = 0
  with files.open(path, "rb") as f:
    while block := f.read(_BLOCK):
      crc = zlib.crc32(block, crc)
  return crc


def _files(step_dir: str) -> list:
  """Every file of a step (relative paths, sorted) but the checksum file and its temporary."""
  return [f for f in files.files_under(step_dir) if not f.startswith(FILE)]


def write(step_dir: str) -> None:
  """Writes `step_dir`/kiln_checksums.json (atomically: a reader sees all of it or none)."""
  sums = {f: [files.getsize(os.path.join(step_dir, f)), _crc32(os.path.join(step_dir, f))]
          for f in _files(step_dir)}
  files.write_atomic(os.path.join(step_dir, FILE), json.dumps({"crc32": sums}))


def verify(step_dir: str, skip=()) -> tuple:
  """(verdict, what is wrong): verdict "ok", "unverified" (no checksum file), or the reason a step
  is bad: "missing" (a file), "truncated" (a file's size differs), "checksum" (its bytes differ).
  Items named in `skip` ("opt_state": a reader of params only) are not read."""
  path = os.path.join(step_dir, FILE)
  if not files.isfile(path):
    return UNVERIFIED, f"{path} not found"
  try:
    with files.open(path) as f:
      sums = json.load(f)["crc32"]
  except (ValueError, KeyError, OSError) as e:
    return "checksum", f"{path} unreadable ({e})"
  for name, (size, crc) in sums.items():
    if name.split(os.sep)[0] in skip:
      continue
    file = os.path.join(step_dir, name)
    if not files.isfile(file):
      return "missing", f"{name} is missing"
    if files.getsize(file) != size:
      return "truncated", f"{name} is {files.getsize(file)} bytes, {size} were saved"
    if _crc32(file) != crc:
      return "checksum", f"{name} does not match its checksum (bytes changed since the save)"
  return OK, ""


def set_aside(checkpoints: str, step: int, reason: str) -> str:
  """Moves `checkpoints`/<step> to `checkpoints`-corrupt/<step>-<reason>[-n]; returns where it went."""
  dest_root = checkpoints.rstrip(os.sep) + "-corrupt"
  files.makedirs(dest_root)
  dest, n = os.path.join(dest_root, f"{step}-{reason}"), 1
  while files.exists(dest):
    dest, n = os.path.join(dest_root, f"{step}-{reason}-{n}"), n + 1
  files.rename(os.path.join(checkpoints, str(step)), dest)
  return dest
