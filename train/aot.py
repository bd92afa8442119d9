"""Check a pod config before the pod: compile its train step for a TPU slice on this host.

  python -m train.aot --config configs/pretrain_llama3_8b.py --topology v5p-256 [--out x.json] \
      [--config.KEY=VALUE ...]

No data, no checkpoint, no real array: parameters, optimizer state and the batch are shapes with
their shardings on a compile-only mesh of the slice (train/topology.py), and the step is the one
`python -m train` runs (train/loop.py `make_train_step`). It prints (and writes to --out) one JSON
object: whether the step fits a chip's HBM, its memory per chip, FLOPs per step (the model's own
formula: XLA counts a scanned layer once), collectives per chip per step with the share that is
asynchronous, the largest arrays, and a roofline estimate of the step time and MFU from the chip's
published figures (train/chips.py). A step that does not fit is an error naming its biggest arrays.
"""
import json
import math

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from model import sharding
from model.transformer import ModelConfig, Transformer
from configs.errors import UserError
from train import chips, cli, cpu_tuning, hlo_stats, objectives, optim, topology
from train import state as state_lib
from train.loop import make_train_step
from train.params import abstract_params, lora_shapes
from train.validate import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain_llama3_8b.py.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v4-N, v5p-N, v5e-N, v6e-N or GEN:AxBxC.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON report here.")
flags.mark_flags_as_required(["config", "topology"])

GiB = 2 ** 30


def _shaped(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_shapes(config, objective, mesh) -> dict:
  """The global batch the step takes, as shapes sharded over the batch axes."""
  b, t = config.batch_size, config.seq_len
  i32, f32 = jnp.int32, jnp.float32
  if objective.packed:
    spec = {k: ((b, t), i32) for k in ("inputs", "targets", "segment_ids", "positions")}
    spec["loss_mask"] = ((b, t), f32)
  else:  # pairs: one row [prompt | chosen | rejected]; completion slots at most the row
    spec = {k: ((b, t), i32) for k in ("tokens", "positions", "segment_ids", "branch_ids")}
    spec.update({k: ((b, t), i32) for k in ("targets", "logit_slots", "target_branch")})
    spec.update({"ends": ((b, 2), i32), "weight": ((b,), f32)})
    if config.dpo.precompute_reference and objective.needs_reference(config):
      spec["ref_logps"] = ((b, 2), f32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in spec.items()}


def _bytes_per_chip(tree) -> int:
  """Bytes one device holds of a tree of sharded shapes."""
  return sum(jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(tree))


def lower_train_step(config, mesh):
  """(lowered step, params shapes, opt-state shapes, train FLOPs per step) of config's objective.

  Under LoRA the params are the adapters and the frozen base (in lora.base_dtype, or quantized)."""
  objective = objectives.get(config.objective)
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg)
  tx, lr_fn = optim.make_optimizer(config.optim, config.steps)
  lora_cfg = config.lora if state_lib.lora_enabled(config) else None
  with sharding.use_mesh(mesh):
    abs_params, param_sh, _, boxed = abstract_params(model, config.seq_len, mesh, objective.extra_params)
    frozen = None
    if lora_cfg is not None:  # adapters over the frozen base, stored as the run stores it (quantized...)
      abs_params, param_sh, abs_frozen, frozen_sh = lora_shapes(lora_cfg, abs_params, param_sh, mesh)
      boxed, frozen = abs_params, _shaped(abs_frozen, frozen_sh)
    boxed_opt = jax.eval_shape(tx.init, boxed)
    opt_sh = sharding.tree_shardings(boxed_opt, mesh)
    params, opt = _shaped(abs_params, param_sh), _shaped(sharding.unbox(boxed_opt), opt_sh)
    ref = None
    needs_ref = objective.needs_reference(config) and not config.dpo.precompute_reference
    if needs_ref and frozen is None:
      ref = params  # a frozen full copy, sharded like the params (under LoRA: the base itself)
    step = make_train_step(model, objective, tx, lr_fn, config.optim.grad_accum, lora_cfg, config,
                           ref_is_frozen=needs_ref and frozen is not None)
    jitted = jax.jit(step, out_shardings=(param_sh, opt_sh, None), donate_argnums=(0, 1))
    batch = batch_shapes(config, objective, mesh)
    lowered = jitted.lower(params, opt, batch, jax.ShapeDtypeStruct((), jnp.int32), frozen, ref)
    params = params if frozen is None else (params, frozen)  # every param byte the step holds
  flops = model_cfg.train_flops_per_token(config.seq_len) * config.batch_size * config.seq_len
  if needs_ref:
    flops *= 4 / 3  # a reference forward: a third of a train step
  return lowered, params, opt, flops


# Bytes a chip sends per byte of a collective's result: a ring all-reduce is a reduce-scatter then an
# all-gather, so about twice its result; the others about once.
ICI_BYTES_PER_RESULT_BYTE = {"all-reduce": 2.0}


def _ici_seconds(collectives: dict, chip) -> tuple[float, float]:
  """(seconds of synchronous, of asynchronous collectives) per step at the chip's ICI bandwidth."""
  sent = lambda key: sum(ICI_BYTES_PER_RESULT_BYTE.get(k, 1.0) * c[key] for k, c in collectives.items())
  return (sent("bytes") - sent("async_bytes")) / chip.ici_bandwidth, sent("async_bytes") / chip.ici_bandwidth


def report(config, topology_name: str) -> dict:
  """Compiles config's step for the slice; the JSON report (see the module docstring)."""
  devices = topology.devices(topology_name)
  chip = chips.chip_of(devices[0].device_kind)
  validate(config, len(devices), 1)
  objectives.get(config.objective).check(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  lowered, params, opt, flops = lower_train_step(config, mesh)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  hlo = hlo_stats.stats(compiled.as_text())
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  n = len(devices)
  compute_s = flops / n / chip.peak_flops
  work_s = max(compute_s, hlo["hbm_bytes"] / chip.hbm_bandwidth)  # compute and HBM traffic overlap
  sync_s, async_s = _ici_seconds(hlo["collectives"], chip)
  est = work_s + sync_s + max(0.0, async_s - work_s)  # waited-for collectives add; async ones hide
  times = {"compute_s": compute_s, "hbm_s": hlo["hbm_bytes"] / chip.hbm_bandwidth,
           "ici_sync_s": sync_s, "ici_async_s": async_s}
  return {
      "config": config.objective, "topology": topology_name, "chips": n, "chip": chip.name,
      "fits": peak <= chip.hbm_bytes,
      "per_chip": {"hbm_bytes": int(chip.hbm_bytes), "peak_bytes": int(peak),
                   "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
                   "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
                   "params_bytes": _bytes_per_chip(params), "opt_state_bytes": _bytes_per_chip(opt)},
      "flops_per_step": flops,
      "collectives": {k: {"count": int(v["count"]), "bytes": int(v["bytes"]), "async_bytes": int(v["async_bytes"])}
                      for k, v in hlo["collectives"].items()},
      "hbm_traffic_bytes": int(hlo["hbm_bytes"]),
      "largest_buffers": hlo["largest_buffers"],
      "roofline": times, "est_step_s": est, "est_mfu": compute_s / est if est else 0.0,
  }


def main(argv):
  cli.no_arguments(argv)
  cpu_tuning.apply()
  out = report(_CONFIG.value, _TOPOLOGY.value)
  text = json.dumps(out, indent=1)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")
  if not out["fits"]:
    biggest = ", ".join(f"{b['shape']} ({b['bytes'] / GiB:.1f} GiB, {b['op']})" for b in out["largest_buffers"][:3])
    raise UserError(f"the step needs {out['per_chip']['peak_bytes'] / GiB:.1f} GiB per chip, "
                    f"{out['per_chip']['hbm_bytes'] / GiB:.0f} GiB available; biggest arrays: {biggest}",
                    hint="more chips (a bigger --topology), a smaller config.batch_size, model.remat=full, "
                         "or config.logits_chunk")


if __name__ == "__main__":
  cli.run(main)
