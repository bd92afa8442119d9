"""What every stage sets up before its state (the offline trainer and the online RL one alike).

Reading and writing the run directory (DIR/config.json, checkpoints) is train/rundir.py.
"""
import dataclasses
from typing import Any, Callable

import jax

from configs.errors import UserError
from model import sharding
from model.transformer import ModelConfig, Transformer
from train import init_source, run_tokenizer, rundir


@dataclasses.dataclass(frozen=True)
class Run:
  """What every stage (train/loop.py and rl/loop.py) sets up before its state."""
  config: Any                  # resolved (init_from="hf:DIR" fills in the model shape)
  mesh_shape: dict             # {"data": ..., "fsdp": ..., "tensor": ...}
  mesh: jax.sharding.Mesh
  tokenizer: Any               # stored in DIR/tokenizer/ (train/run_tokenizer.py)
  tokenizer_note: str          # where the tokenizer came from (the run's first log line)
  model_cfg: ModelConfig
  model: Transformer
  mngr: Any                    # the orbax CheckpointManager of DIR/checkpoints


def start_run(config, workdir: str, check: Callable) -> Run:
  """Resolves and checks the config (`check(config)` -> mesh shape, raising on a bad key), writes
  DIR/config.json, picks the tokenizer (train/init_source.py `tokenizer`; its ids must fit the
  model's vocabulary) and stores it in DIR/tokenizer/ before the first step, and builds the mesh,
  model and checkpoint manager."""
  config = init_source.resolve(config, workdir)
  mesh_shape = check(config)
  rundir.save_config(workdir, config)
  tokenizer, note = init_source.tokenizer(config, workdir)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise UserError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                    f"tokenizer's {tokenizer.vocab_size} ids ({note})",
                    f"set config.model.vocab_size >= {tokenizer.vocab_size}")
  run_tokenizer.save(workdir, tokenizer)
  model_cfg = ModelConfig.from_config(config.model)
  return Run(config, mesh_shape, sharding.make_mesh(config.mesh), tokenizer, note, model_cfg,
             Transformer(model_cfg), rundir.manager(workdir, config.keep_checkpoints, config.async_checkpoints))

