"""What `config.init_from` fixes besides the params: the model shape of a Hugging Face start point,
and the tokenizer of any start point.

`init_from="hf:DIR"` (or a run dir holding `hf_config.json`: `python -m train.rundir
--config.import_hf=DIR`,
or any stage that started from one) takes `config.model`'s shape keys from that config.json:
- config.model left at a named preset of configs/models.py (the stage's default): replaced;
- otherwise every shape key must equal the HF value; the error names each one that does not.
An empty `config.tokenizer.path` becomes the HF tokenizer (the directory, if it has
tokenizer.json or tokenizer.model; for a run dir, its stored DIR/tokenizer/, else its own
tokenizer.path). The HF config is copied to `workdir/hf_config.json`, so later stages and
`--to hf` export know where they came from.

The tokenizer of a stage (`tokenizer`), stored in its workdir when it starts (train/run_tokenizer.py):
- resuming (a finished checkpoint in workdir): the one it stored, never rebuilt from config.data;
- else `config.tokenizer.path` > the init_from run's stored one (or a hf: directory's) > one
  trained on config.data (train/data.py). A tokenizer.path that differs from init_from's is an error
  naming both: the params of init_from only mean something with the ids they were trained on.
"""
import copy
import os

from configs import models
from configs.errors import UserError
from model import hf_config, hf_tokenizer
from train import data, files, rundir, run_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def hf_source(init_from: str):
  """(HF config dict, where it was read, tokenizer path or '') of init_from, or None."""
  if not init_from:
    return None
  if init_from.startswith(rundir.HF_PREFIX):
    d = files.absolute(init_from[len(rundir.HF_PREFIX):])
    has_tok = any(files.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES)
    return hf_config.read(rundir.hf_dir(init_from)), os.path.join(d, "config.json"), d if has_tok else ""
  hf = rundir.read_hf_config(init_from)
  if hf is None:
    return None
  tok = ""
  if run_tokenizer.stored(init_from) is not None:
    tok = files.absolute(run_tokenizer.directory(init_from))
  elif files.isfile(os.path.join(init_from, rundir.CONFIG)):
    tok = rundir.load_config(init_from).get("tokenizer", {}).get("path", "")
  return hf, os.path.join(init_from, rundir.HF_CONFIG), tok


def _is_preset(model) -> bool:
  mine = hf_config.normalized(dict(model))
  return any(hf_config.normalized(dict(make())) == mine for make in models.PRESETS.values())


def resolve(config, workdir: str = ""):
  """`config` (a copy) with the model shape and tokenizer of an HF init_from; else `config` itself.
  With `workdir`, the HF config is copied to workdir/hf_config.json (train/stage.py: once checked)."""
  src = hf_source(config.init_from)
  if src is None:
    return config
  hf, where, tok = src
  want = hf_config.to_model(hf, where)
  if not _is_preset(config.model):
    have = hf_config.normalized(dict(config.model))
    bad = [k for k in hf_config.SHAPE_KEYS if have[k] != want[k]]
    if bad:
      raise UserError(f"config.init_from={config.init_from}: " + "; ".join(
          f"config.model.{k}={have[k]} but {where} gives {want[k]}" for k in bad)
          + " (leave config.model at its preset to take the shape from config.json)")
  config = copy.deepcopy(config)
  for key, value in want.items():
    config.model[key] = value
  if tok and not config.tokenizer.path:
    config.tokenizer.path = tok
  if workdir:
    rundir.save_hf_config(workdir, hf)
  return config


def _has_checkpoint(workdir: str) -> bool:
  ckpt = os.path.join(workdir, "checkpoints")
  return files.isdir(ckpt) and any(d.isdigit() for d in files.listdir(ckpt))


def _init_from_tokenizer(init_from: str):
  """(the tokenizer init_from fixes, a note): a run dir's (stored, or rebuilt from the config.json of
  a run from before DIR/tokenizer/), a hf: directory's; else (None, "")."""
  if not init_from:
    return None, ""
  if init_from.startswith(rundir.HF_PREFIX):
    d = rundir.hf_dir(init_from)
    has = any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES)
    return (hf_tokenizer.load(d), f"tokenizer of {init_from}") if has else (None, "")
  if run_tokenizer.stored(init_from) is None and not files.isfile(os.path.join(init_from, rundir.CONFIG)):
    return None, ""
  return run_tokenizer.load(init_from, rundir.load_config(init_from)), f"tokenizer of {init_from}"


def _explicit(config):
  path = files.local(config.tokenizer.path)  # a gs:// one: downloaded
  if not os.path.exists(path):
    raise UserError(f"config.tokenizer.path={config.tokenizer.path}: no such file or directory",
                    "give a SentencePiece .model file or a Hugging Face tokenizer directory, or '' "
                    "for the tokenizer of config.init_from (or one trained on config.data)")
  return hf_tokenizer.load_tokenizer(path)


def _same(explicit, other, message: str, hint: str) -> None:
  """Raises UserError(message) when tokenizers `explicit` and `other` (either may be None) differ."""
  if explicit is not None and other is not None and run_tokenizer.identity(explicit) != run_tokenizer.identity(other):
    raise UserError(message, hint)


def tokenizer(config, workdir: str):
  """(the tokenizer of the stage `config` in `workdir`, a note saying where it came from); see the
  module's docstring. Raises UserError when config.tokenizer.path differs from what the run
  stored or from init_from's."""
  explicit = _explicit(config) if config.tokenizer.path else None
  path = config.tokenizer.path
  if _has_checkpoint(workdir):  # resuming
    mine = run_tokenizer.stored(workdir)
    if mine is None:  # a run from before DIR/tokenizer/: as it was made
      return data.load_or_train_tokenizer(config), f"{workdir} stored no tokenizer: rebuilt from its config"
    _same(explicit, mine, f"config.tokenizer.path={path} differs from the tokenizer this run started "
          f"with ({run_tokenizer.directory(workdir)})",
          "resume without config.tokenizer.path, or start the new tokenizer in another --workdir")
    return mine, f"tokenizer stored in {run_tokenizer.directory(workdir)}"
  source, note = _init_from_tokenizer(config.init_from)
  _same(explicit, source, f"config.tokenizer.path={path} differs from the tokenizer of "
        f"config.init_from={config.init_from} ({source and source.path})",
        "drop config.tokenizer.path to use init_from's tokenizer, or start from a run trained with it")
  if explicit is not None:
    return explicit, f"tokenizer {path}"
  if source is not None:
    return source, note
  return data.load_or_train_tokenizer(config), "tokenizer trained on config.data"
