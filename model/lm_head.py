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
over a `tensor` mesh axis (blocks would cut across its shards and move them between devices).
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
  if w.shape[1] <= VOCAB_BLOCK or b * t < MIN_ROWS or sharding.mesh_axis_size("tensor") > 1:
    return one_dot(h, w)
  blocked = lambda h, w: blocked_matmul(h.reshape(b * t, d), w).reshape(b, t, -1)
  return jax.lax.platform_dependent(h, w, cpu=blocked, default=one_dot)
