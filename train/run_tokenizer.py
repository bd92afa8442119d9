"""A run's tokenizer, kept in its directory: written into DIR/tokenizer/ when the run starts, read
back by whatever reads the run later (its resumption, `init_from`, evaluation, sampling, export), so
a run's token ids never depend on its data files again (appended to, moved or deleted).

    DIR/tokenizer/sentencepiece.model      a SentencePiece model (Kiln's own, trained on the corpus)
    DIR/tokenizer/tokenizer.json | .model  a Hugging Face tokenizer, with its tokenizer_config.json,
                                           chat_template.jinja ...

Runs from before DIR/tokenizer/ existed are read as they were made: from their config
(config.tokenizer.path, else the tokenizer train/data.py trains on config.data), with a warning.
"""
import hashlib
import logging
import os
import shutil
import tempfile

import jax

from model import hf_tokenizer
from model import tokenizer as tokenizer_lib
from train import data, files

SUBDIR = "tokenizer"
SENTENCEPIECE = "sentencepiece.model"
HF_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja")


def directory(workdir: str) -> str:
  return os.path.join(workdir, SUBDIR)


def stored(workdir: str):
  """The tokenizer stored in DIR/tokenizer/, or None when DIR stores none."""
  d = files.local(directory(workdir))  # a gs:// run's: downloaded (the readers take local files)
  if os.path.isfile(os.path.join(d, SENTENCEPIECE)):
    return tokenizer_lib.load_sentencepiece(os.path.join(d, SENTENCEPIECE))
  if any(os.path.isfile(os.path.join(d, n)) for n in HF_FILES[:2]):
    return hf_tokenizer.load(d)
  return None


def identity(tok) -> tuple:
  """What makes two tokenizers the same: their kind and their serialized model's bytes."""
  return type(tok).__name__, hashlib.sha1(tok.model_proto).hexdigest()


def copy_hf_files(src: str, dst: str) -> bool:
  """Copies the HF tokenizer files of directory `src` (or src's directory) into `dst` (either may
  be a gs:// URL)."""
  src = src if files.isdir(src) else os.path.dirname(src)
  names = [n for n in HF_FILES if files.isfile(os.path.join(src, n))]
  if not names:
    return False
  files.makedirs(dst)
  for n in names:
    files.copyfile(os.path.join(src, n), os.path.join(dst, n))
  return True


def _write(tok, out: str) -> None:
  """tok's files in directory `out`: a HF tokenizer's files, or the SentencePiece model."""
  name = SENTENCEPIECE
  if isinstance(tok, (hf_tokenizer.JsonTokenizer, hf_tokenizer.SpecialsTokenizer)):
    if tok.path:
      copy_hf_files(tok.path, out)
    name = "tokenizer.json" if isinstance(tok, hf_tokenizer.JsonTokenizer) else "tokenizer.model"
  with open(os.path.join(out, name), "wb") as f:  # whatever the source file was called
    f.write(tok.model_proto)


def save(workdir: str, tok) -> None:
  """Stores `tok` in DIR/tokenizer/ (process 0 only; the others build the same one), replacing
  what was there; nothing is written when DIR already stores this tokenizer."""
  if jax.process_index() != 0:
    return
  old = stored(workdir)
  if old is not None and identity(old) == identity(tok):
    return
  files.makedirs(workdir)
  new = tempfile.mkdtemp(dir=None if files.is_url(workdir) else workdir, prefix=f".{SUBDIR}.new.")
  try:
    _write(tok, new)
    files.replace_dir(new, directory(workdir))
  finally:
    shutil.rmtree(new, ignore_errors=True)


def load(workdir: str, config):
  """The tokenizer of the run in `workdir` (config: its config.json): the stored one, else (a run
  from before DIR/tokenizer/) the one its config names or trains, with a warning."""
  tok = stored(workdir)
  if tok is None:
    logging.warning("%s stores no tokenizer (a run from before %s/): rebuilt from its config.json "
                    "(config.tokenizer.path, or trained on config.data)", workdir, SUBDIR)
    tok = data.load_or_train_tokenizer(config)
  return tok
