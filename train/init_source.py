"""What `config.init_from` fixes besides the params: the model shape and tokenizer of a Hugging
Face start point.

`init_from="hf:DIR"` (or a run dir holding `hf_config.json`: `python -m model.convert --from hf`,
or any stage that started from one) takes `config.model`'s shape keys from that config.json:
- config.model left at a named preset of configs/models.py (the stage's default): replaced;
- otherwise every shape key must equal the HF value; the error names each one that does not.
An empty `config.tokenizer.path` becomes the HF tokenizer (the directory, if it has
tokenizer.json or tokenizer.model; for a run dir, its own tokenizer.path). The HF config is
copied to `workdir/hf_config.json`, so later stages and `--to hf` export know where they came from.
"""
import copy
import json
import os

from configs import models
from model import hf_config
from train.checkpoint import HF_PREFIX

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def hf_source(init_from: str):
  """(HF config dict, where it was read, tokenizer path or '') of init_from, or None."""
  if not init_from:
    return None
  if init_from.startswith(HF_PREFIX):
    d = os.path.abspath(os.path.expanduser(init_from[len(HF_PREFIX):]))
    has_tok = any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES)
    return hf_config.read(d), os.path.join(d, "config.json"), d if has_tok else ""
  path = os.path.join(init_from, "hf_config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    hf = json.load(f)
  tok = ""
  run_config = os.path.join(init_from, "config.json")
  if os.path.isfile(run_config):
    with open(run_config) as f:
      tok = json.load(f).get("tokenizer", {}).get("path", "")
  return hf, path, tok


def _is_preset(model) -> bool:
  mine = hf_config.normalized(dict(model))
  return any(hf_config.normalized(dict(make())) == mine for make in models.PRESETS.values())


def resolve(config, workdir: str = ""):
  """`config` (a copy) with the model shape and tokenizer of an HF init_from; else `config` itself."""
  src = hf_source(config.init_from)
  if src is None:
    return config
  hf, where, tok = src
  want = hf_config.to_model(hf, where)
  if not _is_preset(config.model):
    have = hf_config.normalized(dict(config.model))
    bad = [k for k in hf_config.SHAPE_KEYS if have[k] != want[k]]
    if bad:
      raise ValueError(f"config.init_from={config.init_from}: " + "; ".join(
          f"config.model.{k}={have[k]} but {where} gives {want[k]}" for k in bad)
          + " (leave config.model at its preset to take the shape from config.json)")
  config = copy.deepcopy(config)
  for key, value in want.items():
    config.model[key] = value
  if tok and not config.tokenizer.path:
    config.tokenizer.path = tok
  if workdir:
    import jax
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "hf_config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
  return config
