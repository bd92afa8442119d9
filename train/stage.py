"""What every stage sets up before its state (the offline trainer and the online RL one alike).

Reading and writing the run directory (DIR/config.json, checkpoints) is train/rundir.py.
"""
import dataclasses
import json
import os
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils

from configs.errors import UserError
from model import sharding
from model import tokenizer as tokenizer_lib
from model.transformer import ModelConfig, Transformer
from train import checkpoints, files, init_source, run_tokenizer, rundir

# Keys (and sections) a resumed run may not change: its checkpoint holds params of their shape.
FIXED_ON_RESUME = ("config.model.", "config.tokenizer.", "config.objective", "config.lora.rank",
                   "config.lora.targets", "config.lora.base_dtype", "config.lora.quantize",
                   "config.lora.block_size", "config.rl.value_model")


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


def check_sources(config) -> None:
  """Every run `config` starts from or reads (init_from, rl.reward_model, rl.value_init_from) has a
  checkpoint: else a UserError naming the key, before anything is written."""
  rl = config.get("rl") or {}
  for key, path in (("init_from", config.init_from), ("rl.reward_model", rl.get("reward_model", "")),
                    ("rl.value_init_from", rl.get("value_init_from", ""))):
    if not path:
      continue
    if path.startswith(rundir.HF_PREFIX):
      hf_dir = files.absolute(path[len(rundir.HF_PREFIX):])
      if not files.isfile(os.path.join(hf_dir, "config.json")):
        raise UserError(f"config.{key}={path}: no config.json in {hf_dir}",
                        hint="hf:DIR is a Hugging Face checkpoint directory (config.json, *.safetensors)")
    elif not files.isdir(path) or rundir.latest_step(path) is None:
      what = "no such directory" if not files.isdir(path) else "no finished checkpoint there"
      raise UserError(f"config.{key}={path}: {what}",
                      hint="give the --workdir of a run that saved a checkpoint (or hf:DIR)")


def flatten(tree: dict, prefix: str = "config") -> dict:
  """{"config.a.b": value} of a nested dict (a config's JSON)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}.{key}"))
    else:
      out[f"{prefix}.{key}"] = value
  return out


def fixed(name: str) -> bool:
  """Whether a key may not change on resume: it shapes the checkpoint (model, tokenizer, adapters,
  objective, value head)."""
  return name.startswith(FIXED_ON_RESUME)


def check_resume(config, workdir: str) -> list:
  """Compares `config` with DIR/config.json of a run that has a checkpoint: a key that shapes the
  checkpoint and differs is a UserError listing each one; the others are returned as lines
  `config.optim.lr: 0.003 (saved) -> 0.001` to log. [] for a fresh run.

  With several processes, process 0's view of DIR decides for all: it writes DIR before the others
  may look (a process that saw its checkpoints/ of this launch opened a reader, whose orbax barrier
  met process 0's 'CheckpointManager:create_directory': "sync_global_devices name mismatch")."""
  has = lambda name: files.exists(os.path.join(workdir, name))
  resumed = checkpoints.agree(has(rundir.CONFIG) and has("checkpoints"))
  if not resumed or rundir.latest_step(workdir) is None:
    return []
  saved = flatten(rundir.load_config(workdir).to_dict())
  now = flatten(json.loads(config.to_json()))
  changes = [(k, saved.get(k, "(absent)"), now.get(k, "(absent)")) for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
  lines = {k: f"{k}: {old!r} (saved) -> {new!r}" for k, old, new in changes}
  bad = [line for k, line in lines.items() if fixed(k) and k in saved and k in now]  # a new key: logged
  if bad:
    raise UserError(f"{workdir} holds checkpoints of another model: " + "; ".join(bad),
                    hint="resume with the saved values, or start this config in another --workdir")
  return list(lines.values())


def start_run(config, workdir: str, check: Callable) -> Run:
  """Resolves and checks the config (`check(config)` -> mesh shape, raising on a bad key) and what it
  starts from, compares it with the saved config of a resumed run (check_resume), then writes
  DIR/config.json, picks the tokenizer (train/init_source.py `tokenizer`; its ids must fit the
  model's vocabulary) and stores it in DIR/tokenizer/ before the first step, and builds the mesh,
  model and checkpoint manager. A rejected launch leaves DIR/config.json as it was."""
  check_sources(config)
  resolved = init_source.resolve(config)
  mesh_shape = check(resolved)
  changed = check_resume(resolved, workdir)
  if jax.process_count() > 1:  # DIR/config.json read by all before process 0 rewrites it
    multihost_utils.sync_global_devices("kiln: resume checked")
  if jax.process_index() == 0:
    for line in changed:
      print(f"resume: {line}", flush=True)
  config = init_source.resolve(config, workdir)  # the same, now writing DIR/hf_config.json
  tokenizer, note = init_source.tokenizer(config, workdir)
  if config.objective != "pretrain":
    tokenizer_lib.check_template(tokenizer, config.data.chat_template)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise UserError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                    f"tokenizer's {tokenizer.vocab_size} ids ({note})",
                    f"set config.model.vocab_size >= {tokenizer.vocab_size}")
  rundir.save_config(workdir, config)
  run_tokenizer.save(workdir, tokenizer)
  model_cfg = ModelConfig.from_config(config.model)
  return Run(config, mesh_shape, sharding.make_mesh(config.mesh), tokenizer, note, model_cfg,
             Transformer(model_cfg), rundir.manager(workdir, config.keep_checkpoints, config.async_checkpoints))

