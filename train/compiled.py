"""What train.aot reads off one compiled program: memory per chip, collectives, a roofline time.

`program_report(compiled, flops, chip, n)` gives the fields every compiled step of the report has
(train/aot.py): memory per chip from XLA's analysis, FLOPs per call (the caller's formula: XLA
counts a scanned layer once), collectives per chip with the share that is asynchronous
(train/hlo_stats.py), the largest arrays, and the step time and MFU at the chip's published
figures (train/chips.py).
"""
import math

import jax
import jax.numpy as jnp

from train import hlo_stats

# Bytes a chip sends per byte of a collective's result: a ring all-reduce is a reduce-scatter then an
# all-gather, so about twice its result; the others about once.
ICI_BYTES_PER_RESULT_BYTE = {"all-reduce": 2.0}


def shaped(abstract, shardings):
  """Abstract arrays with their shardings: what `jit(...).lower` takes instead of real arrays."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def bytes_per_chip(tree) -> int:
  """Bytes one device holds of a tree of sharded shapes."""
  return sum(jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(tree))


def _ici_seconds(collectives: dict, chip) -> tuple[float, float]:
  """(seconds of synchronous, of asynchronous collectives) per step at the chip's ICI bandwidth."""
  sent = lambda key: sum(ICI_BYTES_PER_RESULT_BYTE.get(k, 1.0) * c[key] for k, c in collectives.items())
  return (sent("bytes") - sent("async_bytes")) / chip.ici_bandwidth, sent("async_bytes") / chip.ici_bandwidth


def program_report(compiled, flops: float, chip, n: int) -> dict:
  """per_chip memory (peak = arguments + outputs - donated + temporaries + code), flops_per_step,
  collectives, hbm_traffic_bytes, largest_buffers, roofline, est_step_s, est_mfu of one program
  compiled for n chips."""
  mem = compiled.memory_analysis()
  hlo = hlo_stats.stats(compiled.as_text())
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  compute_s = flops / n / chip.peak_flops
  work_s = max(compute_s, hlo["hbm_bytes"] / chip.hbm_bandwidth)  # compute and HBM traffic overlap
  sync_s, async_s = _ici_seconds(hlo["collectives"], chip)
  est = work_s + sync_s + max(0.0, async_s - work_s)  # waited-for collectives add; async ones hide
  times = {"compute_s": compute_s, "hbm_s": hlo["hbm_bytes"] / chip.hbm_bandwidth,
           "ici_sync_s": sync_s, "ici_async_s": async_s}
  return {
      "per_chip": {"hbm_bytes": int(chip.hbm_bytes), "peak_bytes": int(peak),
                   "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
                   "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)},
      "flops_per_step": flops,
      "collectives": {k: {"count": int(v["count"]), "bytes": int(v["bytes"]), "async_bytes": int(v["async_bytes"])}
                      for k, v in hlo["collectives"].items()},
      "hbm_traffic_bytes": int(hlo["hbm_bytes"]),
      "largest_buffers": hlo["largest_buffers"],
      "roofline": times, "est_step_s": est, "est_mfu": compute_s / est if est else 0.0,
  }
