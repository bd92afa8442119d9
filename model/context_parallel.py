"""Context parallelism: causal self-attention over rows whose tokens are split across devices.

With config.mesh.sequence = n > 1 the `length` axis of every activation is split n ways over the
`sequence` mesh axis (model/sharding.py RULES): device i holds tokens [i * t/n, (i + 1) * t/n) of
every row. All but attention works token by token; attention runs here as a ring inside a
shard_map. Each device keeps its queries and folds in one block of t/n keys and values at a
time, then hands the block (with its segment ids and branches) on to the next device: after
n - 1 hand-offs (`ppermute`, issued before the block's scores so the transfer overlaps them)
every query has seen every key. The blocks combine by the online softmax of flash attention, so a
device holds [QUERY_BLOCK, t/n] scores at a time, never [t/n, t], and the backward pass recomputes
each block's scores (jax.checkpoint) instead of storing them. The mask is model/attention.py's
`attention_mask`: same segment (packed documents), key slot <= query slot, branches.

Causal masks leave the work unbalanced (device 0's queries need one block, device n - 1's all n),
and every device computes all n blocks, the masked ones too: a step costs what the last device
needs. Positions (RoPE) are per token and arrive with the batch, split like the tokens.
"""
import functools
import math

import jax
import jax.numpy as jnp

from configs.errors import UserError
from model import sharding

AXIS = "sequence"
NEG_INF = -1e30  # as model/attention.py: a fully masked row gets uniform weights, never NaN
QUERY_BLOCK = 2048  # queries per score block within a hop: [.., 2048, t/n] scores at a time


def block_mask(q_segments, k_segments, q_slots, k_slots, q_branches, k_branches):
  """[b, 1, 1, tq, tk] bool: model/attention.py `attention_mask` between a block of queries and a
  block of keys. Segments and branches [b, tq] / [b, tk]; slots [tq] / [tk], both global."""
  same_doc = q_segments[:, :, None] == k_segments[:, None, :]
  causal = (q_slots[:, None] >= k_slots[None, :])[None]
  branch = (k_branches[:, None, :] == 0) | (q_branches[:, :, None] == k_branches[:, None, :])
  return (same_doc & causal & branch)[:, None, None]


def fold_block(q, k, v, mask, stats=None):
  """One block of keys into the online softmax of queries q [b, tq, kv, g, hd] (pre-scaled).

  k, v [b, tk, kv, hd]; mask [b, 1, 1, tq, tk]; stats (running max m, running sum l [b, kv, g, tq],
  weighted values acc [b, kv, g, tq, hd], all fp32), None before the first block. The max only
  keeps exp() in range: the output acc / l does not depend on it, so it carries no gradient."""
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)  # [b, kv, g, tq, tk]
  scores = jnp.where(mask, scores, NEG_INF)
  m_block = jax.lax.stop_gradient(jnp.max(scores, -1))
  m = m_block if stats is None else jnp.maximum(stats[0], m_block)
  w = jnp.exp(scores - m[..., None])
  wv = jnp.einsum("bkgts,bskh->bkgth", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
  if stats is None:
    return m, jnp.sum(w, -1), wv
  correction = jnp.exp(stats[0] - m)
  return m, stats[1] * correction + jnp.sum(w, -1), stats[2] * correction[..., None] + wv


def _split(x, axis: int, n: int):
  """x with its `axis` cut into n equal blocks, stacked on a new leading axis."""
  return jnp.moveaxis(x.reshape(x.shape[:axis] + (n, -1) + x.shape[axis + 1:]), axis, 0)


def _merge(x, axis: int):
  """Inverse of _split: [n, ...] blocks laid back along `axis`."""
  y = jnp.moveaxis(x, 0, axis)
  return y.reshape(y.shape[:axis] + (-1,) + y.shape[axis + 2:])


def _ring(q, k, v, segments, branches, *, n: int, query_block: int):
  """On one device: its queries q [b, tl, kv, g, hd] against the keys k, v [b, tl, kv, hd] of all n
  devices, segments and branches [b, tl] -> [b, tl, kv, g, hd]. Within a hop the queries go
  `query_block` at a time (when it divides tl), each block under jax.checkpoint."""
  tl, hd = q.shape[1], q.shape[-1]
  me = jax.lax.axis_index(AXIS)
  local = jnp.arange(tl)
  q_slots = me * tl + local
  q = q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)
  to_next = lambda block: jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, [(j, (j + 1) % n) for j in range(n)]),
                                       block)

  nq = tl // query_block if 0 < query_block < tl and tl % query_block == 0 else 1

  def fold(block, stats, hop):  # after `hop` hand-offs a device holds the block of device me - hop
    k, v, k_segments, k_branches = block
    k_slots = ((me - hop) % n) * tl + local

    def queries(q, q_segments, q_branches, q_slots, stats):  # [b, tq, kv, g, hd], [b, tq], [b, tq], [tq]
      mask = block_mask(q_segments, k_segments, q_slots, k_slots, q_branches, k_branches)
      return fold_block(q, k, v, mask, stats)

    if nq == 1:
      return queries(q, segments, branches, q_slots, stats)
    blocks = (_split(q, 1, nq), _split(segments, 1, nq), _split(branches, 1, nq), _split(q_slots, 0, nq),
              None if stats is None else tuple(_split(x, 3, nq) for x in stats))
    out = jax.lax.map(lambda xs: jax.checkpoint(queries)(*xs), blocks)
    return tuple(_merge(x, 3) for x in out)

  def hop(carry, i):  # the hand-off of the next block overlaps this one's scores
    block, stats = carry
    return (to_next(block), fold(block, stats, i)), None

  own = (k, v, segments, branches)
  (block, stats), _ = jax.lax.scan(jax.checkpoint(hop), (to_next(own), fold(own, None, 0)), jnp.arange(1, n - 1))
  _, l, acc = fold(block, stats, n - 1)
  return (acc / l[..., None]).transpose(0, 3, 1, 2, 4).astype(v.dtype)  # [b, tl, kv, g, hd]


def attention(q, k, v, segment_ids, branches=None, query_block: int = QUERY_BLOCK):
  """Causal self-attention of rows split over the `sequence` mesh axis, as model/attention.py
  `causal_attention` of `attention_mask(segment_ids, segment_ids, slots, slots, branches)`.

  q [b, t, kv, group, hd], k/v [b, t, kv, hd], segment_ids and branches (or None) [b, t]: global
  arrays inside a jit under `sharding.use_mesh` -> [b, t, kv, group, hd], split like q.
  query_block: queries per score block within a hop ([.., query_block, t/n] scores at a time)."""
  n = sharding.mesh_axis_size(AXIS)
  t = q.shape[1]
  if t % n:
    raise UserError(f"config.mesh.sequence={n} does not split rows of {t} tokens",
                    hint="make config.seq_len a multiple of config.mesh.sequence")
  mesh = jax.sharding.get_abstract_mesh()
  spec = lambda x, *names: sharding.spec_for(("batch", "length") + names, x.shape, mesh)
  branches = jnp.zeros_like(segment_ids) if branches is None else branches
  q_spec, kv_spec, row_spec = spec(q, "act_kv_heads", None, None), spec(k, "act_kv_heads", None), spec(segment_ids)
  ring = jax.shard_map(functools.partial(_ring, n=n, query_block=query_block), mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec), out_specs=q_spec)
  return ring(q, k, v, segment_ids, branches)
