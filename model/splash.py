"""Causal self-attention of packed rows with the Pallas splash-attention kernel (TPU).

The einsum path (model/attention.py grouped_attention) builds fp32 scores [b, kv, group, t, t]:
at t = 8192 that is 256 MiB per head and row. Splash attention computes the same softmax in VMEM
tiles of [block, block] and never stores the scores; it skips the tiles above the diagonal (a
static causal mask by slot) and masks across documents with the segment ids, which is exactly
`attention_mask` without branches. Grouped-query attention is native: query head h reads kv head
h // group, the order of the fused qkv kernel's slots.

The kernel runs on one row at a time (vmapped over the batch) and on the heads it is given, so it
runs under shard_map over the mesh: rows over the batch axes, kv heads (with their query groups)
over `tensor`. Off a TPU (tests) it runs in Pallas interpret mode: the same kernel, slowly.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from model import sharding

BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; a tile's kv side must be a multiple of 128
RESIDUALS = "context"     # checkpoint name of the kernel's output and logsumexp (model/transformer.py)


def fits(seq_len: int) -> bool:
  """Whether rows of seq_len tokens tile into the kernel's blocks."""
  return seq_len % BLOCKS[-1] == 0


def block_sizes(seq_len: int) -> sa.BlockSizes:
  """The largest of BLOCKS that divides seq_len, for every tile of the forward and backward kernels."""
  b = next(b for b in BLOCKS if seq_len % b == 0)
  return sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                       block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


# Matmuls of one [block, block] tile in each kernel: the forward q k^T and p v; the dq kernel
# q k^T again, do v^T and ds k; the dkv kernel q k^T, p^T do, do v^T and ds^T q.
TILE_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def flops(kernel: str, operands: list):
  """FLOPs of one call of a splash kernel (its HLO custom call's name, e.g.
  "splash_mha_dq_segmented_no_residuals", and operand dims: q [b, heads, t, hd] and k [b, kv, t,
  hd] third and fourth), or None for another kernel: every tile on or below the diagonal of the
  causal mask, n (n + 1) / 2 of the n x n of [block, block] (train/hlo_flops.py)."""
  phase = kernel.split("_")[2] if kernel.startswith("splash_") and kernel.count("_") >= 2 else None
  if phase not in TILE_MATMULS or len(operands) < 4:
    return None
  q = operands[2]
  rows_heads, t, hd = math.prod(q[:-2]), q[-2], q[-1]
  block = block_sizes(t).block_q
  n = t // block
  return TILE_MATMULS[phase] * 2.0 * rows_heads * block * block * hd * n * (n + 1) / 2


def _kernel(heads: int, seq_len: int, interpret: bool):
  """The splash kernel of `heads` query heads over causal rows of seq_len. Built while tracing, not
  cached: its mask tables become arrays of the trace that builds it."""
  mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(heads)])
  return sa.make_splash_mha(mask, block_sizes=block_sizes(seq_len), head_shards=1, q_seq_shards=1,
                            residual_checkpoint_name=RESIDUALS, interpret=interpret)


def _rows(q, k, v, segment_ids, interpret: bool):
  """The kernel on local shards: q [b, t, kv, g, hd], k/v [b, t, kv, hd], segment_ids [b, t]."""
  b, t, kv, g, hd = q.shape
  kernel = _kernel(kv * g, t, interpret)
  heads_first = lambda x: jnp.moveaxis(x.reshape(b, t, -1, hd), 1, 2)         # [b, heads, t, hd]
  segments = sa.SegmentIds(segment_ids, segment_ids)
  out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v), segments)  # [b, kv * g, t, hd]
  return jnp.moveaxis(out, 2, 1).reshape(b, t, kv, g, hd)


def _at_default_precision(f):
  """f with its forward and backward kernels traced at the default matmul precision. A Pallas
  kernel's dots take the precision in force when its body is traced (the backward kernels' while
  the backward pass is), and Mosaic has no "highest" for bf16 operands: a process-wide
  jax_default_matmul_precision=highest (the tests set it) would fail to compile."""
  default = lambda: jax.default_matmul_precision("default")

  @jax.custom_vjp
  def g(*args):
    with default():
      return f(*args)

  def fwd(*args):
    with default():
      return jax.vjp(f, *args)  # (out, the backward pass: a pytree of its residuals)

  def bwd(backward, dout):
    with default():
      return backward(dout)

  g.defvjp(fwd, bwd)
  return g


def attention(q, k, v, segment_ids):
  """q [b, t, kv, group, hd], k/v [b, t, kv, hd], segment_ids [b, t] -> [b, t, kv, group, hd].

  Each query sees the keys of its own segment at slots up to its own (`attention_mask` of
  model/attention.py without branches); t must satisfy `fits`. Inside a mesh the kernel runs per
  shard (rows over the batch axes, kv heads over `tensor` where they divide); a sequence split over
  a mesh axis is gathered first, since each row's kernel needs all of its keys."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  q = q * jnp.asarray(scale, q.dtype)
  platform = sharding.mesh_platform()
  run = functools.partial(_rows, interpret=platform != "tpu")
  if q.dtype != jnp.float32:
    run = _at_default_precision(run)
  if platform is None:
    return run(q, k, v, segment_ids)
  mesh = jax.sharding.get_abstract_mesh()
  q_spec = sharding.spec_for(("batch", None, "act_kv_heads", None, None), q.shape, mesh)
  kv_spec = sharding.spec_for(("batch", None, "act_kv_heads", None), k.shape, mesh)
  seg_spec = sharding.spec_for(("batch", None), segment_ids.shape, mesh)
  return jax.shard_map(run, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, segment_ids)
