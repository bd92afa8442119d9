"""The LM head matmul: final hidden states [b, t, d] -> logits [b, t, vocab].

Compiled for the CPU it runs as column blocks of VOCAB_BLOCK vocabulary entries. XLA:CPU's Eigen
dots slow down when the output's rows are a power-of-two size apart, as vocabularies of 4096 or
8192 entries make them: on the 2-core development box [2048, 256] x [256, N] ran at 74-77
GFLOP/s for N = 4096 and 125-136 for N = 4000. In 1024-wide blocks, [2048, 256] x [256, 4096]
went from 81 to 132 GFLOP/s and its weight gradient (h^T @ dlogits) from 72 to 101; `medium`'s
[2048, 512] x [512, 8192] from 82 to 131 and 77 to 109. The input gradient (dlogits @ W^T, a
narrow output) stays one dot. Other platforms get the plain dot, which their compilers tile
themselves (chosen when the program is lowered: `jax.lax.platform_dependent`), and so do few
rows (decoding: [8, 256] x [256, 4096] is 2x slower in blocks), and so does a vocabulary split
over a `tensor` mesh axis (blocks would cut across its shards and move them between devices), and
so do rows split over a `sequence` axis ([b * t] rows would cut across its shards).
"""
import functools

import jax
import jax.numpy as jnp

from model import sharding

VOCAB_BLOCK = 1024
MIN_ROWS = 256  # fewer rows than this: one dot


def _blocks(n: int):
  return [(a, min(a + VOCAB_BLOCK, n)) for a in range(0, n, VOCAB_BLOCK)]


@jax.custom_vjp
def blocked_matmul(x, w):
  """x [m, k] @ w [k, n] -> [m, n], computed as n / VOCAB_BLOCK column blocks."""
  return jnp.concatenate([x @ w[:, a:e] for a, e in _blocks(w.shape[1])], axis=1)


def _fwd(x, w):
  return blocked_matmul(x, w), (x, w)


def _bwd(res, g):
  x, w = res
  dw = jnp.concatenate([x.T @ g[:, a:e] for a, e in _blocks(w.shape[1])], axis=1)  # [k, n]
  return (g @ w.T).astype(x.dtype), dw.astype(w.dtype)


blocked_matmul.defvjp(_fwd, _bwd)


def logits(h, kernel, tied: bool):
  """h [b, t, d] -> [b, t, vocab]; kernel is lm_head [d, vocab], or the embedding [vocab, d] if tied."""
  w = kernel.T if tied else kernel  # [d, vocab]
  b, t, d = h.shape
  one_dot = lambda h, w: jnp.einsum("btd,dv->btv", h, w)
  split = sharding.mesh_axis_size("tensor") > 1 or sharding.mesh_axis_size("sequence") > 1
  if w.shape[1] <= VOCAB_BLOCK or b * t < MIN_ROWS or split:
    return one_dot(h, w)
  blocked = lambda h, w: blocked_matmul(h.reshape(b * t, d), w).reshape(b, t, -1)
  return jax.lax.platform_dependent(h, w, cpu=blocked, default=one_dot)


def kernel_of(params, cfg):
  """The head's weight in compute dtype: lm_head [d, vocab], or the embedding [vocab, d] if tied."""
  return (params["embedding"] if cfg.tie_embeddings else params["lm_head"]).astype(cfg.dtype)


def _in_chunks(stats, h, targets, chunk: int):
  """stats(h [b, c, d], targets [b, c]) -> tuple of [b, c] arrays, run on `chunk` positions at a
  time under jax.checkpoint (the backward recomputes each chunk's logits), so only [b, chunk,
  vocab] logits exist. t is padded up to a multiple of chunk (pads are cut from the result);
  chunk <= 0 or >= t: one piece. Chunk i holds every n-th position from i on (n = t / chunk
  chunks): rows split over a `sequence` mesh axis stay split within each chunk, where contiguous
  chunks would each live on one device and be moved between them."""
  b, t, d = h.shape
  if chunk <= 0 or chunk >= t:
    return stats(h, targets)
  n = -(-t // chunk)
  pad = n * chunk - t
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hs = h.reshape(b, chunk, n, d).transpose(2, 0, 1, 3)     # [n, b, c, d]
  ys = targets.reshape(b, chunk, n).transpose(2, 0, 1)      # [n, b, c]
  _, outs = jax.lax.scan(lambda _, xs: (None, jax.checkpoint(stats)(*xs)), None, (hs, ys))
  return tuple(o.transpose(1, 2, 0).reshape(b, n * chunk)[:, :t] for o in outs)


def row_shards(b: int) -> int:
  """Ways the batch axes (data x fsdp) split b rows, where the head keeps one kernel copy per shard
  of rows (`gathered`); 1 outside a mesh, where they do not divide b, or where `sequence` splits
  the positions (each copy's gradient would still be partial over it)."""
  ways = sharding.mesh_axis_size("data") * sharding.mesh_axis_size("fsdp")
  return ways if ways > 1 and b % ways == 0 and sharding.mesh_axis_size("sequence") == 1 else 1


def _layout(tied: bool):
  """(logical axes of the kernel gathered, of the kernel as stored): vocab over `tensor` in both,
  the embed dimension over fsdp as stored."""
  return ((("vocab", None), ("vocab", "embed")) if tied else ((None, "vocab"), ("embed", "vocab")))


def gathered(kernel, tied: bool, shards: int = 1):
  """The head's kernel whole on every device (split over `tensor` by vocab if that axis is), before
  the chunk loop: one all-gather of the fsdp shards per step instead of one per chunk (and per
  recomputed chunk). lm_head [d, vocab], or the tied embedding [vocab, d].

  shards > 1 (`row_shards`): as [shards, ...] copies, one per shard of rows over the batch axes
  (each device holds its own, no more memory than the whole kernel): each device sums its chunks'
  gradients into its copy, a real array where XLA would hold a partial sum it reduces as it sees
  fit (an all-reduce over every chip, then a slice), and the copies' gradients are reduced
  explicitly once after the loop: reduce-scattered over fsdp to the kernel's own sharding, then
  all-reduced over data."""
  whole, _ = _layout(tied)
  if shards == 1:
    return sharding.constrain(kernel, whole)
  return _copies(kernel, tied, shards)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _copies(kernel, tied: bool, shards: int):
  whole, _ = _layout(tied)
  w = sharding.constrain(kernel, whole)
  return sharding.constrain(jnp.broadcast_to(w[None], (shards, *w.shape)), ("batch", *whole))


def _copies_fwd(kernel, tied, shards):
  return _copies(kernel, tied, shards), None


def _copies_bwd(tied, shards, _, g):
  """g [shards, ...] (sharded over the batch axes) -> the kernel's gradient in its own sharding."""
  whole, own = _layout(tied)
  mesh = jax.sharding.get_abstract_mesh()
  out_spec = sharding.spec_for(own, g.shape[1:], mesh)
  embed = own.index("embed")

  def reduce(local):  # [1, ...] this device's copy
    x = local[0]
    if out_spec[embed] is not None:  # the embed dimension split over fsdp: each chip its slice
      x = jax.lax.psum_scatter(x, "fsdp", scatter_dimension=embed, tiled=True)
    else:
      x = jax.lax.psum(x, "fsdp")
    return jax.lax.psum(x, "data")

  in_spec = sharding.spec_for(("batch", *whole), g.shape, mesh)
  return (jax.shard_map(reduce, in_specs=in_spec, out_specs=out_spec, check_vma=False)(g),)


_copies.defvjp(_copies_fwd, _copies_bwd)


def _logits32(h, kernel, tied: bool):
  """h [b, c, d] and the kernel (`gathered`; [shards, ...]: each shard of rows with its copy)."""
  if kernel.ndim == 3:
    s, (b, c, d) = kernel.shape[0], h.shape
    hs = sharding.constrain(h.reshape(s, b // s, c, d), ("batch", None, "length", "act_embed"))
    z = jax.vmap(lambda h, w: logits(h, w, tied))(hs, kernel).reshape(b, c, -1)
  else:
    z = logits(h, kernel, tied)
  return sharding.constrain(z.astype(jnp.float32), ("batch", "length", "act_vocab"))


def token_nll(h, kernel, tied: bool, targets, chunk: int = 0):
  """Next-token NLL in fp32 and whether the argmax is the target, from final hidden states.

  h [b, t, d], targets [b, t] -> (nll [b, t] float32, hit [b, t] bool). chunk > 0: the head runs
  on `chunk` positions at a time (`_in_chunks`), so no [b, t, vocab] array exists in the forward
  or the backward pass. Same values and gradients as chunk = 0 (one piece)."""
  kernel = gathered(kernel, tied, row_shards(h.shape[0]))
  def stats(h_c, y_c):  # [b, c, d], [b, c]
    z = _logits32(h_c, kernel, tied)
    target = jnp.take_along_axis(z, y_c[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(z, axis=-1) - target, jnp.argmax(z, axis=-1) == y_c
  return _in_chunks(stats, h, targets, chunk)


def token_logps(h, kernel, tied: bool, targets, chunk: int = 0, temperature: float = 1.0,
                entropy: bool = False):
  """log p(target) in fp32 under softmax(logits / temperature), and the distribution's entropy.

  h [b, t, d], targets [b, t] -> (logp [b, t], entropy [b, t] or None): DPO's completion
  log-probs, the RL scoring and update passes. In `chunk` positions at a time as token_nll."""
  kernel = gathered(kernel, tied, row_shards(h.shape[0]))
  def stats(h_c, y_c):  # [b, c, d], [b, c]
    z = _logits32(h_c, kernel, tied)
    if temperature != 1.0:
      z = z / temperature
    lse = jax.nn.logsumexp(z, axis=-1)                                       # [b, c]
    logp = jnp.take_along_axis(z, y_c[..., None], axis=-1)[..., 0] - lse
    if not entropy:
      return (logp,)
    return logp, lse - jnp.sum(jnp.exp(z - lse[..., None]) * z, axis=-1)     # H = lse - E_p[z]
  out = _in_chunks(stats, h, targets, chunk)
  return out[0], (out[1] if entropy else None)
