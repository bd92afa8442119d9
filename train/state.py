"""Training state: what is trained (full params, or LoRA adapters over a frozen base), its
optimizer state, and where it came from (random init, `init_from`, or this run's checkpoint).

Everything is created directly in its sharded layout: shapes come from `jax.eval_shape`, and
init / restore write each shard straight to its device, so no host ever holds the whole model.
"""
import dataclasses
from typing import Any, Optional

import flax.traverse_util as traverse
import jax

from configs.errors import UserError
from model import lora, quant, sharding
from train import rundir
from train.params import abstract_params, lora_shapes


@dataclasses.dataclass
class State:
  trainable: Any            # full params, or LoRA adapters
  opt_state: Any
  frozen: Optional[Any]     # under LoRA the frozen base (lora.base_dtype, maybe quantized), else None
  trainable_shardings: Any
  opt_shardings: Any
  start: int                # step to continue from
  meta: dict                # this run's checkpoint metadata (data iterator state, lora base)
  source: str               # human-readable origin, for the start-up line


def to_params(trainable, frozen, lora_cfg):
  """The model's params: `trainable` itself, or the frozen base with the adapters next to their
  kernels, applied unmerged by the model (model/lora.py `attach`)."""
  return trainable if frozen is None else lora.attach(frozen, trainable, lora_cfg)


def frozen_base(config, abs_params, param_sh, frozen_sh):
  """The LoRA base of `config.init_from` as the step holds it (train/params.py `lora_shapes`):
  restored, then stored leaf by leaf, each full-precision leaf dropped once stored."""
  base, _ = rundir.restore_params(config.init_from, abs_params, param_sh)
  flat = traverse.flatten_dict(base, sep="/")
  del base
  if config.lora.quantize == "none" and all(w.dtype == config.lora.base_dtype for w in flat.values()):
    return traverse.unflatten_dict(flat, sep="/")
  shardings = traverse.flatten_dict(frozen_sh, sep="/", is_leaf=lambda _, v: quant.is_quantized(v))
  out, stores = {}, {}
  for path in list(flat):
    # one compiled store per kind of leaf (quantized along which axis, layout), shared by the layers
    axis = quant.kernel_axis(path) if quant.quantized(path, config.lora.quantize) else None
    key = (axis, repr(shardings[path]))
    if key not in stores:
      stores[key] = jax.jit(lambda w, p=path: quant.store(p, w, config.lora), out_shardings=shardings[path])
    out[path] = stores[key](flat.pop(path))
  return traverse.unflatten_dict(out, sep="/")


def lora_enabled(config) -> bool:
  return config.lora.rank > 0


def setup(config, model, tx, mesh, mngr, extra_params=None) -> State:
  """Resumes from `mngr`'s newest step that restores, or starts from `config.init_from`, or from scratch.

  `extra_params` (see abstract_params) that `init_from` lacks are initialised here.
  """
  abs_params, param_sh, init_boxed, boxed = abstract_params(model, config.seq_len, mesh, extra_params)
  use_lora = lora_enabled(config)
  frozen = None
  if use_lora:
    if not config.init_from:
      raise UserError("config.lora.rank > 0 needs config.init_from: the frozen base to adapt")
    abs_train, train_sh, _, frozen_sh = lora_shapes(config.lora, abs_params, param_sh, mesh)
    frozen = frozen_base(config, abs_params, param_sh, frozen_sh)
  else:
    abs_train, train_sh = abs_params, param_sh
  # Optimizer state: mu / nu inherit the params' logical boxes (so their sharding); scalars and
  # adapters' states are replicated.
  boxed_opt = jax.eval_shape(tx.init, abs_train if use_lora else boxed)
  abs_opt, opt_sh = sharding.unbox(boxed_opt), sharding.tree_shardings(boxed_opt, mesh)

  resumed = rundir.restore_newest(mngr, abs_train, train_sh, abs_opt, opt_sh)
  if resumed is not None:  # the newest step that restores completely (bad newer ones moved aside)
    start, trainable, opt_state, meta, note = resumed
    return State(trainable, opt_state, frozen, train_sh, opt_sh, start, meta,
                 f"resumed from step {start}" + (f" ({note})" if note else ""))

  rng = jax.random.key(config.seed)
  if use_lora:
    trainable = jax.jit(lambda: lora.init_adapters(abs_params, config.lora, rng), out_shardings=train_sh)()
    source = f"LoRA rank {config.lora.rank} over {config.init_from}" + _base_note(config.lora)
  elif config.init_from:
    extra = list(jax.eval_shape(lambda r: extra_params(model.cfg, r), rng)) if extra_params else []
    trainable, from_step = rundir.restore_params(config.init_from, abs_params, param_sh, missing_ok=extra)
    source = f"initialised from {config.init_from} (step {from_step})"
    missing = [k for k in abs_params if k not in trainable]
    if missing:  # e.g. SFT -> reward model: the head is new
      fresh = jax.jit(lambda r: {k: sharding.unbox(init_boxed(r))[k] for k in missing},
                      out_shardings={k: param_sh[k] for k in missing})(rng)
      trainable = {**trainable, **fresh}
      source += f"; {', '.join(missing)} not in it: initialised at random"
  else:
    trainable = jax.jit(lambda r: sharding.unbox(init_boxed(r)), out_shardings=param_sh)(rng)
    source = "initialised at random"
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
  return State(trainable, opt_state, frozen, train_sh, opt_sh, 0, {}, source)


def _base_note(lora_cfg) -> str:
  """How the frozen base is held, for the start-up line ("" for float32, unquantized)."""
  notes = [f"{lora_cfg.base_dtype} base"] if lora_cfg.base_dtype != "float32" else []
  if lora_cfg.quantize != "none":
    notes.append(f"{lora_cfg.quantize} layer kernels (blocks of {lora_cfg.block_size})")
  return f" ({', '.join(notes)})" if notes else ""


def checkpoint_meta(config) -> dict:
  """What a later reader needs besides the arrays: for LoRA, the base and the adapter config."""
  if not lora_enabled(config):
    return {}
  return {"lora": {"base": rundir.absolute(config.init_from), "config": config.lora.to_dict()}}
