"""Load a finished (or running) workdir for evaluation: its config, tokenizer and latest params."""
import dataclasses
import json
import os
from typing import Any

import ml_collections

from model import sharding
from model.tokenizer import Tokenizer
from model.transformer import ModelConfig, Transformer


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  model: Transformer
  params: Any
  tokenizer: Tokenizer
  mesh: Any
  step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a run directory of `python -m train`")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, step=None, mesh_cfg=None) -> Run:
  """Params restored straight into their sharded layout on `mesh_cfg` (default: all devices on
  the data axis), merged with LoRA adapters if the run trained adapters."""
  from train import checkpoint, data, state
  config = load_config(workdir)
  mesh = sharding.make_mesh(mesh_cfg or dict(data=-1, fsdp=1, tensor=1))
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg)
  abs_params, shardings, _, _ = state.abstract_params(model, 8, mesh)
  with sharding.use_mesh(mesh):
    params, step = checkpoint.restore_params(workdir, abs_params, shardings, step)
  return Run(config, model_cfg, model, params, data.load_or_train_tokenizer(config), mesh, step)
