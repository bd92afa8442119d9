"""Sampling the next token from logits: temperature, top-k, exact sort-free top-p, inverse CDF.

Sampling is temperature -> top-k -> top-p (the Hugging Face order; each filter renormalises).
Top-p is exact and sort-free: a search over the float32 bit patterns of the probabilities finds
the smallest kept probability, then ONE uniform per row picks a token by inverse CDF (so all
uniforms can be drawn before a decode loop). model/decode.py calls `sample` once per step.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp


def top_k_mask(logits, k: int):
  """bool [..., V]: exactly the k largest logits (ties broken towards the lower id)."""
  v = logits.shape[-1]
  if k <= 0 or k >= v:
    return jnp.ones(logits.shape, bool)
  _, idx = jax.lax.top_k(logits, k)                                 # [..., k]
  flat = idx.reshape(-1, k)
  rows = jnp.arange(flat.shape[0])[:, None]
  return jnp.zeros((flat.shape[0], v), bool).at[rows, flat].set(True).reshape(logits.shape)


def row_sums(x):
  """sum(x, -1, keepdims=True): [..., V] -> [..., 1]. Compiled for the CPU, a matrix-vector
  product: XLA:CPU runs a dot as one call but a long reduction as a tree of 3-4 reduce-window
  calls. GPU and TPU compilers fuse reductions into their neighbours, so they get the plain sum
  (the choice is made when the program is lowered)."""
  return jax.lax.platform_dependent(
      x, cpu=lambda x: x @ jnp.ones((x.shape[-1], 1), x.dtype),
      default=lambda x: jnp.sum(x, -1, keepdims=True))


def top_p_threshold(weights, p, max_weight: float = float("inf")):
  """Smallest kept weight of top-p, exact and sort-free. weights [..., V] >= 0 (unnormalised).

  Returns the largest float t with sum(w[w >= t]) >= p * sum(w), as [..., 1]. Non-negative
  floats order like their int32 bit patterns, so t is built bit by bit from the top (radix
  descent): keep a bit if the weights at or above the candidate still hold p of the mass. One
  masked sum per bit, 31 bits (30 if max_weight <= 1, e.g. exp(x - max x)): no sort."""
  need = p * row_sums(weights)                                      # [..., 1]
  t = jnp.zeros(need.shape, jnp.int32)                              # S(t) >= need holds
  top = 29 if max_weight <= 1.0 else 30                             # bits(1.0) < 2 ** 30

  def keep_bit(i, t):
    cand = t | jnp.left_shift(1, top - i)
    kept = jnp.where(weights >= jax.lax.bitcast_convert_type(cand, jnp.float32), weights, 0.0)
    return jnp.where(row_sums(kept) >= need, cand, t)

  t = jax.lax.fori_loop(0, top + 1, keep_bit, t)
  return jax.lax.bitcast_convert_type(t, jnp.float32)


def top_p_mask(probs, p: float):
  """bool [..., V]: the smallest set of top tokens whose probability sums to >= p (ties kept)."""
  if p >= 1.0:
    return jnp.ones(probs.shape, bool)
  return probs >= top_p_threshold(probs, p)


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Sampling logits [..., V]: logits / T with tokens outside top-k, then top-p, at -inf."""
  x = logits.astype(jnp.float32) / max(temperature, 1e-6)
  x = jnp.where(top_k_mask(x, top_k), x, -jnp.inf)
  if top_p < 1.0:
    w = jnp.exp(x - jnp.max(x, -1, keepdims=True))
    x = jnp.where(w >= top_p_threshold(w, top_p, max_weight=1.0), x, -jnp.inf)
  return x


def inverse_cdf(weights, u, block: int = 64):
  """Index i with cumsum(w)[i-1] <= u * sum(w) < cumsum(w)[i]: one uniform u [b] per row.

  weights [b, V] >= 0. Two levels (blocks of `block`, then inside the block) so the prefix sums
  are small triangular matmuls. Rounding can never pick a zero-weight token."""
  b, v = weights.shape
  n = -(-v // block)
  w = jnp.pad(weights, ((0, 0), (0, n * block - v))).reshape(b, n, block)   # [b, n, block]
  tri = lambda m: jnp.triu(jnp.ones((m, m), jnp.float32))                     # [m, m]
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)

  def pick(cum, target, positive):  # cum/positive [b, m], target [b] -> first index with cum > target
    last = jnp.max(jnp.where(positive, jnp.arange(cum.shape[-1]), 0), -1)
    return jnp.minimum(jnp.sum(cum <= target[:, None], -1), last)

  sums = row_sums(w)[..., 0]                                                  # [b, n]
  cum = dot(sums, tri(n))                                                     # [b, n]
  target = u * cum[:, -1]
  blk = pick(cum, target, sums > 0)                                           # [b]
  before = jnp.take_along_axis(cum - sums, blk[:, None], -1)[:, 0]            # [b]
  inner = jnp.take_along_axis(w, blk[:, None, None], 1)[:, 0]                 # [b, block]
  idx = pick(before[:, None] + dot(inner, tri(block)), target, inner > 0)
  return blk * block + idx


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick the next token. temperature 0 = greedy; top_k 0 and top_p 1 = off."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


def sample(key, logits, s: Sampling, u=None):
  """(tokens [b], log-prob under the model [b], log-prob under the sampling distribution [b]).

  logits [b, V]. The model log-prob is log_softmax of the raw (temperature 1) logits; the
  sampling one is of the filtered, renormalised distribution (0 for greedy). u [b]: the uniforms
  to use instead of drawing them from `key`."""
  logits = logits.astype(jnp.float32)
  top = jnp.max(logits, -1, keepdims=True)                                    # [b, 1]
  e = jnp.exp(logits - top)                                                   # [b, V], max 1
  lse = (top + jnp.log(row_sums(e)))[:, 0]                                    # [b]
  if s.temperature <= 0.0:
    tok = jnp.argmax(logits, -1)
    return tok, jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - lse, jnp.zeros_like(lse)
  w = e if s.temperature == 1.0 else jnp.exp((logits - top) / s.temperature)  # max(x / T) = max(x) / T
  if s.top_k > 0:
    w = jnp.where(top_k_mask(logits, s.top_k), w, 0.0)
  if s.top_p < 1.0:
    w = jnp.where(w >= top_p_threshold(w, s.top_p, max_weight=1.0), w, 0.0)
  tok = inverse_cdf(w, jax.random.uniform(key, lse.shape) if u is None else u)
  pick = lambda a: jnp.take_along_axis(a, tok[:, None], -1)[:, 0]
  return tok, pick(logits) - lse, jnp.log(pick(w)) - jnp.log(row_sums(w)[:, 0])
