"""What train.aot reads off one compiled program: memory per chip, collectives, a roofline time.

`program_report(compiled, flops, chip, n)` gives the fields every compiled step of the report has
(train/aot.py): memory per chip from XLA's analysis, the model's FLOPs per call (the caller's
formula, what MFU counts) and the FLOPs the compiled program runs (its matmuls and attention
kernels, rematerialized passes included: train/hlo_flops.py), collectives per chip: their results,
the bytes a chip sends for them over ICI and the share of those that is asynchronous
(train/hlo_stats.py), the largest arrays, and the step time and MFU at the chip's published figures
(train/chips.py).

The step time is a roofline: max(the compiled FLOPs at the chip's peak, its HBM traffic at the
chip's bandwidth) + the collectives it waits for + the asynchronous ones beyond that work. MFU is
the model's FLOPs over what the chips could do in that time; it is a bound (the MXUs at peak).
"""
import math

import jax
import jax.numpy as jnp

from model import splash
from train import hlo_flops, hlo_stats

def shaped(abstract, shardings):
  """Abstract arrays with their shardings: what `jit(...).lower` takes instead of real arrays."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def bytes_per_chip(tree) -> int:
  """Bytes one device holds of a tree of sharded shapes."""
  return sum(jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(tree))


def fsdp_ideal_ici_bytes(n_params: int, itemsize: int, fsdp: int, data: int, gathers: int, grads: bool) -> float:
  """Bytes a chip sends per step for FSDP done ideally: every parameter all-gathered `gathers` times
  over the fsdp chips (in the forward, and again in a rematerialized backward), its gradient
  reduce-scattered once (`grads`: the params are trained) then all-reduced over the data chips,
  all in the compute dtype (itemsize bytes); ring algorithms (train/hlo_stats.py `ici_bytes`)."""
  full = n_params * itemsize
  gather = full * (fsdp - 1) / fsdp
  sent = gathers * gather
  if grads:
    sent += gather + 2 * (full / fsdp) * (data - 1) / data
  return sent


def _share(collectives: dict, part: str, whole: str) -> float:
  """sum of `part` over sum of `whole` across the kinds of collectives (1 when there are none)."""
  total = sum(c[whole] for c in collectives.values())
  return sum(c[part] for c in collectives.values()) / total if total else 1.0


def _ici_seconds(collectives: dict, chip) -> tuple[float, float]:
  """(seconds of waited-for collectives: synchronous, or asynchronous with nothing to overlap; of
  overlapped ones) per step at the chip's ICI bandwidth."""
  sent = lambda key: sum(c[key] for c in collectives.values()) / chip.ici_bandwidth
  overlapped = sent("async_ici_bytes") - sent("exposed_ici_bytes")
  return sent("ici_bytes") - overlapped, overlapped


def program_report(compiled, flops: float, chip, n: int) -> dict:
  """per_chip memory (peak = arguments + outputs - donated + temporaries + code), flops_per_step
  (the model's, all chips), compiled_flops_per_step and kernel_flops_per_step (what the program
  runs, all chips; custom calls without a FLOP count under unknown_kernels), collectives, the
  asynchronous share of their result bytes (async_share) and of their ICI bytes (async_ici_share),
  the share of ICI bytes asynchronous but with no compute to overlap (exposed_ici_share),
  hbm_traffic_bytes, largest_buffers, roofline, est_step_s, est_mfu of one program compiled for n
  chips."""
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  hlo = hlo_stats.stats(text, n)
  ran = hlo_flops.flops(text, splash.flops)  # per chip
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  compute_s = (ran["matmul"] + ran["kernels"]) / chip.peak_flops
  work_s = max(compute_s, hlo["hbm_bytes"] / chip.hbm_bandwidth)  # compute and HBM traffic overlap
  waited_s, overlapped_s = _ici_seconds(hlo["collectives"], chip)
  est = work_s + waited_s + max(0.0, overlapped_s - work_s)  # waited-for collectives add; overlapped ones hide
  times = {"compute_s": compute_s, "hbm_s": hlo["hbm_bytes"] / chip.hbm_bandwidth,
           "ici_waited_s": waited_s, "ici_overlapped_s": overlapped_s}
  return {
      "per_chip": {"hbm_bytes": int(chip.hbm_bytes), "peak_bytes": int(peak),
                   "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
                   "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
                   "host_temp_bytes": int(mem.host_temp_size_in_bytes)},  # e.g. remat=offload's layer inputs
      "flops_per_step": flops,
      "compiled_flops_per_step": (ran["matmul"] + ran["kernels"]) * n,
      "kernel_flops_per_step": ran["kernels"] * n,
      "unknown_kernels": ran["unknown_kernels"],
      "collectives": {k: {f: int(x) for f, x in v.items()} for k, v in hlo["collectives"].items()},
      "async_share": _share(hlo["collectives"], "async_bytes", "bytes"),
      "async_ici_share": _share(hlo["collectives"], "async_ici_bytes", "ici_bytes"),
      "exposed_ici_share": _share(hlo["collectives"], "exposed_ici_bytes", "ici_bytes"),
      "hbm_traffic_bytes": int(hlo["hbm_bytes"]),
      "largest_buffers": hlo["largest_buffers"],
      "roofline": times, "est_step_s": est,
      "est_mfu": flops / (n * chip.peak_flops * est) if est else 0.0,
  }
