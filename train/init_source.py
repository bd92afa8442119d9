"""What `config.init_from` fixes besides the params: the model shape and tokenizer of a Hugging
Face start point.

`init_from="hf:DIR"` (or a run dir holding `hf_config.json`: `python -m train.rundir
--config.import_hf=DIR`,
or any stage that started from one) takes `config.model`'s shape keys from that config.json:
- config.model left at a named preset of configs/models.py (the stage's default): replaced;
- otherwise every shape key must equal the HF value; the error names each one that does not.
An empty `config.tokenizer.path` becomes the HF tokenizer (the directory, if it has
tokenizer.json or tokenizer.model; for a run dir, its own tokenizer.path). The HF config is
copied to `workdir/hf_config.json`, so later stages and `--to hf` export know where they came from.
"""
import copy
import os

from configs import models
from configs.errors import UserError
from model import hf_config
from train import rundir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def hf_source(init_from: str):
  """(HF config dict, where it was read, tokenizer path or '') of init_from, or None."""
  if not init_from:
    return None
  if init_from.startswith(rundir.HF_PREFIX):
    d = os.path.abspath(os.path.expanduser(init_from[len(rundir.HF_PREFIX):]))
    has_tok = any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES)
    return hf_config.read(d), os.path.join(d, "config.json"), d if has_tok else ""
  hf = rundir.read_hf_config(init_from)
  if hf is None:
    return None
  tok = ""
  if os.path.isfile(os.path.join(init_from, rundir.CONFIG)):
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
