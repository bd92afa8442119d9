"""Check a pod config before the pod: compile its train step for a TPU slice on this host.

  python -m train.aot --config configs/pretrain_llama3_8b.py --topology v5p-256 [--out x.json] \
      [--config.KEY=VALUE ...]

No data, no checkpoint, no real array: parameters, optimizer state and the batch are shapes with
their shardings on a compile-only mesh of the slice (train/topology.py), and the step is the one
`python -m train` runs (train/loop.py `make_train_step`). It prints (and writes to --out) one JSON
object: whether the step fits a chip's HBM, its memory per chip, FLOPs per step (the model's
formula, what MFU counts, and what the compiled step runs: rematerialized passes and attention
kernels included, train/hlo_flops.py), collectives per chip per step (results, ICI bytes sent)
with the share that is asynchronous (and of that, what has no compute to overlap), "fsdp": those
ICI bytes against FSDP done ideally, the largest arrays, and a roofline estimate of the step time
and MFU from the chip's published figures (train/chips.py) (train/compiled.py). The step is
compiled with the XLA options `config.compiler_options` picks for TPU (train/compiler_options.py).
A step that does not fit is an error naming its biggest arrays.

An online RL objective (grpo, rloo, gspo, ppo) is several programs (rl/aot.py): the update step,
the rollout's prefill and one decode step. Its report has one entry per program under "programs"
(the fields above, each with its own "fits") and "per_chip" of the arrays that stay on the chips
across them (policy params and optimizer state, critic, frozen reference); a program fits when its
peak plus the resident arrays it does not take (need_bytes) fit, the config when every one does.
This module is an entry point, so it may import the rl layer (as train/pipeline.py).
"""
import json

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from model import sharding
from model.transformer import ModelConfig, Transformer
from configs.errors import UserError
from rl import aot as rl_aot
from rl.algorithms import ALGORITHMS
from train import chips, cli, compiled, compiler_options, cpu_tuning, objectives, optim, pairs, topology
from train import state as state_lib
from train.compiled import shaped
from train.loop import make_train_step
from train.params import abstract_params, lora_shapes
from train.validate import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain_llama3_8b.py.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v4-N, v5p-N, v5e-N, v6e-N or GEN:AxBxC.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON report here.")
flags.mark_flags_as_required(["config", "topology"])

GiB = 2 ** 30


def batch_shapes(config, objective, mesh) -> dict:
  """The global batch the step takes, as shapes sharded over the batch axes."""
  b, t = config.batch_size, config.seq_len
  i32, f32 = jnp.int32, jnp.float32
  if objective.packed:
    spec = {k: ((b, t), i32) for k in ("inputs", "targets", "segment_ids", "positions")}
    spec["loss_mask"] = ((b, t), f32)
  else:  # pairs: one row [prompt | chosen | rejected] each (slots [b]), or packed (train/pairs.py: R rows of
    pack = pairs.Packing.of(config)  # L tokens, G pair slots each); completion slots at most the row
    rows, slots = ((b, t), (b,)) if pack is None else ((pack.rows, pack.row_len), (pack.rows, pack.per_row))
    spec = {k: (rows, i32) for k in ("tokens", "positions", "segment_ids", "branch_ids")}
    spec.update({k: (rows, i32) for k in ("targets", "logit_slots", "target_branch", "target_pair")})
    spec.update({"ends": ((*slots, 2), i32), "weight": (slots, f32)})
    if config.dpo.precompute_reference and objective.needs_reference(config):
      spec["ref_logps"] = ((*slots, 2), f32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(
              mesh, len(shape), shape[1] if len(shape) > 1 else 0)) for k, (shape, dtype) in spec.items()}


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
      boxed, frozen = abs_params, shaped(abs_frozen, frozen_sh)
    boxed_opt = jax.eval_shape(tx.init, boxed)
    opt_sh = sharding.tree_shardings(boxed_opt, mesh)
    params, opt = shaped(abs_params, param_sh), shaped(sharding.unbox(boxed_opt), opt_sh)
    ref = None
    needs_ref = objective.needs_reference(config) and not config.dpo.precompute_reference
    if needs_ref and frozen is None:
      ref = params  # a frozen full copy, sharded like the params (under LoRA: the base itself)
    step = make_train_step(model, objective, tx, lr_fn, config.optim.grad_accum, lora_cfg, config,
                           ref_is_frozen=needs_ref and frozen is not None)
    options = compiler_options.for_platform(config.compiler_options, mesh.devices.flat[0].platform)
    jitted = jax.jit(step, out_shardings=(param_sh, opt_sh, None), donate_argnums=(0, 1), compiler_options=options)
    batch = batch_shapes(config, objective, mesh)
    lowered = jitted.lower(params, opt, batch, jax.ShapeDtypeStruct((), jnp.int32), frozen, ref)
    params = params if frozen is None else (params, frozen)  # every param byte the step holds
  rows, row_len = batch["tokens" if "tokens" in batch else "inputs"].shape  # packed pairs: R rows of L
  per_token = model_cfg.train_flops_per_token(row_len, frozen_weights=frozen is not None)
  if frozen is not None:  # the adapters: 6 per trained parameter
    per_token += 6 * sum(x.size for x in jax.tree.leaves(abs_params))
  flops = per_token * rows * row_len
  if needs_ref:
    flops *= 4 / 3  # a reference forward: a third of a train step
  return lowered, params, opt, flops


def fsdp_report(config, mesh, collectives: dict) -> dict:
  """The step's ICI bytes per chip against FSDP done ideally (train/compiled.py): the parameters
  gathered in the forward and again in a rematerialized backward, in the compute dtype, and (unless
  LoRA freezes them) their gradients reduce-scattered once."""
  m = ModelConfig.from_config(config.model)
  gathers = 1 + (m.remat != "none")
  ideal = compiled.fsdp_ideal_ici_bytes(m.num_params(), m.dtype.itemsize, mesh.shape["fsdp"], mesh.shape["data"],
                                        gathers, grads=not state_lib.lora_enabled(config))
  sent = sum(c["ici_bytes"] for c in collectives.values())
  return {"ideal_ici_bytes": int(ideal), "ici_bytes": int(sent), "over_ideal": sent / ideal if ideal else 0.0,
          "gathers_per_param": gathers}


def _offline_report(config, devices, chip) -> dict:
  objectives.get(config.objective).check(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  lowered, params, opt, flops = lower_train_step(config, mesh)
  out = compiled.program_report(lowered.compile(), flops, chip, len(devices))
  out["per_chip"].update(params_bytes=compiled.bytes_per_chip(params), opt_state_bytes=compiled.bytes_per_chip(opt))
  out["fsdp"] = fsdp_report(config, mesh, out["collectives"])
  return {"fits": out["per_chip"]["peak_bytes"] <= chip.hbm_bytes, **out}


def _rl_report(config, devices, chip) -> dict:
  """One entry per program of an RL iteration (rl/aot.py); each needs its peak plus the resident
  arrays (params, optimizer state, critic, reference) it does not take as arguments."""
  rl_aot.check(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  programs, resident = rl_aot.compile_programs(config, ModelConfig.from_config(config.model), mesh)
  held = {k: compiled.bytes_per_chip(v) for k, v in resident.items()}
  out = {}
  for name, (program, flops, takes) in programs.items():
    rep = compiled.program_report(program, flops, chip, len(devices))
    elsewhere = sum(b for k, b in held.items() if k not in takes)
    need = rep["per_chip"]["peak_bytes"] + elsewhere
    rep["per_chip"].update(resident_elsewhere_bytes=elsewhere, need_bytes=need)
    out[name] = {"fits": need <= chip.hbm_bytes, **rep}
  per_chip = {"hbm_bytes": int(chip.hbm_bytes), "resident_bytes": sum(held.values()),
              **{f"{k}_bytes": b for k, b in held.items()}}
  return {"fits": all(p["fits"] for p in out.values()), "per_chip": per_chip, "programs": out}


def report(config, topology_name: str) -> dict:
  """Compiles config's step (an RL objective: its programs) for the slice; the JSON report (see the
  module docstring)."""
  devices = topology.devices(topology_name)
  chip = chips.chip_of(devices[0].device_kind)
  head = {"config": config.objective, "topology": topology_name, "chips": len(devices), "chip": chip.name}
  if config.objective in ALGORITHMS:
    return {**head, **_rl_report(config, devices, chip)}
  validate(config, len(devices), 1)
  return {**head, **_offline_report(config, devices, chip)}


def _too_big(out) -> UserError:
  """The error of a report that does not fit: the program, its need and its biggest arrays."""
  progs = out.get("programs", {"step": out})
  name, p = next((k, v) for k, v in progs.items() if not v["fits"])
  mem = p["per_chip"]
  need = mem.get("need_bytes", mem["peak_bytes"])
  biggest = ", ".join(f"{b['shape']} ({b['bytes'] / GiB:.1f} GiB, {b['op']})" for b in p["largest_buffers"][:3])
  return UserError(f"the {name} needs {need / GiB:.1f} GiB per chip, {mem['hbm_bytes'] / GiB:.0f} GiB available; "
                   f"biggest arrays: {biggest}",
                   hint="more chips (a bigger --topology), a smaller config.batch_size, model.remat=full, "
                        "or config.logits_chunk")


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
    raise _too_big(out)

if __name__ == "__main__":
  cli.run(main)
