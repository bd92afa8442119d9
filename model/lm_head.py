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


def gathered(kernel, tied: bool):
  """The head's kernel whole on every device (split over `tensor` by vocab if that axis is), before
  the chunk loop: one all-gather of the fsdp shards per step instead of one per chunk (and per
  recomputed chunk), and the chunks' gradients summed on each device, reduced once after the loop.
  lm_head [d, vocab], or the tied embedding [vocab, d]."""
  return sharding.constrain(kernel, ("vocab", None) if tied else (None, "vocab"))


def _logits32(h, kernel, tied: bool):
  return sharding.constrain(logits(h, kernel, tied).astype(jnp.float32), ("batch", "length", "act_vocab"))


def token_nll(h, kernel, tied: bool, targets, chunk: int = 0):
  """Next-token NLL in fp32 and whether the argmax is the target, from final hidden states.

  h [b, t, d], targets [b, t] -> (nll [b, t] float32, hit [b, t] bool). chunk > 0: the head runs
  on `chunk` positions at a time (`_in_chunks`), so no [b, t, vocab] array exists in the forward
  or the backward pass. Same values and gradients as chunk = 0 (one piece)."""
  kernel = gathered(kernel, tied)
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
  kernel = gathered(kernel, tied)
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
