"""What every stage sets up before its state (the offline trainer and the online RL one alike), and
reading back the config a stage wrote.

DIR/config.json is the resolved config of the run in DIR: later stages, eval and export read a
run's model shape and tokenizer from it.
"""
import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections

from model import sharding
from model.transformer import ModelConfig, Transformer
from train import checkpoint, data, init_source


@dataclasses.dataclass(frozen=True)
class Run:
  """What every stage (train/loop.py and rl/loop.py) sets up before its state."""
  config: Any                  # resolved (init_from="hf:DIR" fills in the model shape)
  mesh_shape: dict             # {"data": ..., "fsdp": ..., "tensor": ...}
  mesh: jax.sharding.Mesh
  tokenizer: Any
  model_cfg: ModelConfig
  model: Transformer
  mngr: Any                    # the orbax CheckpointManager of DIR/checkpoints


def start_run(config, workdir: str, check: Callable) -> Run:
  """Resolves and checks the config (`check(config)` -> mesh shape, raising on a bad key), writes
  DIR/config.json, and builds the mesh, tokenizer (its ids must fit the model's vocabulary),
  model and checkpoint manager."""
  config = init_source.resolve(config, workdir)
  mesh_shape = check(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  tokenizer = data.load_or_train_tokenizer(config)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size} ids")
  model_cfg = ModelConfig.from_config(config.model)
  return Run(config, mesh_shape, sharding.make_mesh(config.mesh), tokenizer, model_cfg, Transformer(model_cfg),
             checkpoint.manager(workdir, config.keep_checkpoints, config.async_checkpoints))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json that `start_run` wrote in `workdir`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a run directory of `python -m train`")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
