"""Rotary embeddings and grouped-query attention, for training (packed rows) and decoding (KV cache).

Query heads are stored grouped by the kv head they share: q/k/v come out of ONE matmul whose
kernel is [embed, kv_heads, group + 2, head_dim] (group = n_heads // n_kv_heads). Slot g < group
is query head (kv * group + g), slot `group` is the key and slot `group + 1` the value. Sharding
the kv_heads axis over `tensor` therefore keeps every group on one device.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from model import context_parallel, sharding, splash
from model.dense import dense

NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax instead of NaN


def rope_frequencies(head_dim: int, theta: float, scaling) -> jnp.ndarray:
  """Inverse frequencies [head_dim // 2], with optional Llama-3 long-context scaling."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling or scaling.get("factor", 0.0) <= 0.0:
    return inv
  factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_positions"]
  wavelen = 2 * math.pi / inv
  smooth = (old_len / wavelen - lo) / (hi - lo)
  mid = (1 - smooth) * inv / factor + smooth * inv
  out = jnp.where(wavelen > old_len / lo, inv / factor, inv)  # long wavelengths: scaled down
  return jnp.where((wavelen <= old_len / lo) & (wavelen >= old_len / hi), mid, out)


def rope_cos_sin(positions, inv_freq):
  """cos and sin of the rotation angles, each [batch, len, head_dim / 2] fp32.

  Compiled for the CPU they leave through an identity matmul (exact). XLA:CPU fuses an
  elementwise producer into each of its consumers, so without it every fusion that reads cos/sin
  recomputes them: in the backward pass the q/k/v gradient assembly evaluated two transcendentals
  per element of [b * t, (heads + 2 kv) * head_dim]. A dot is never fused, so its output is one
  array, computed once (small train step 530 -> 505 ms, medium 3.94 -> 3.79 s median, interleaved
  A/B). Other platforms get cos and sin as they are (chosen when the program is lowered)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, len, head_dim/2]
  h = inv_freq.shape[-1]

  def through_dot(cos, sin):
    both = jnp.matmul(jnp.concatenate([cos, sin], -1), jnp.eye(2 * h, dtype=jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)  # [batch, len, head_dim]
    return both[..., :h], both[..., h:]

  return jax.lax.platform_dependent(jnp.cos(angles), jnp.sin(angles), cpu=through_dot,
                                    default=lambda cos, sin: (cos, sin))


def apply_rope(x, cos, sin):
  """Rotates x [batch, len, ..., head_dim] by the angles of `rope_cos_sin` (cos, sin [batch, len,
  head_dim / 2]), rotate-half convention."""
  shape = cos.shape[:2] + (1,) * (x.ndim - 3) + cos.shape[-1:]
  cos, sin = cos.reshape(shape), sin.reshape(shape)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(q_segments, k_segments, q_slots, k_slots, branches=None):
  """[batch, 1, 1, q, k] bool: same document (segment id) and key not after the query.

  branches [batch, len] (self-attention only) splits a document into a shared trunk (0) and
  branches (1, 2, ...): a key of branch 0 is seen by every later query of its document, a key of
  branch j > 0 only by queries of branch j. E.g. a preference pair [prompt | chosen | rejected]
  with branches [0.. | 1.. | 2..]: rejected sees the prompt, never the chosen tokens."""
  same_doc = q_segments[:, :, None] == k_segments[:, None, :]
  causal = q_slots[:, :, None] >= k_slots[:, None, :]
  mask = same_doc & causal
  if branches is not None:
    mask &= (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
  return mask[:, None, None]


def training_mask(cfg, segment_ids, branches=None):
  """The mask of a training self-attention (cache-less), built once for all layers: the segment ids
  [batch, t] themselves where the splash kernel runs (it applies the causal part by slot), else
  `attention_mask`'s [batch, 1, 1, t, t]. cfg: the ModelConfig."""
  b, t = segment_ids.shape
  impl = attention_impl(cfg.attention, cfg.dtype, cfg.head_dim, sharding.mesh_platform(), t, branches is None)
  if impl == "splash":
    return segment_ids
  slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  return attention_mask(segment_ids, segment_ids, slots, slots, branches)


def cache_mask(segment_ids, segments, index):
  """[batch, 1, 1, t, T] bool: what t new tokens (slots index.., segment_ids [batch, t]) see of a
  KV cache whose `segments` [batch, T] already hold their ids. Unwritten slots and left padding
  have segment 0; the real tokens of a row share segment 1."""
  b, t = segment_ids.shape
  q_slots = jnp.broadcast_to(index + jnp.arange(t), (b, t))
  k_slots = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
  return attention_mask(segment_ids, segments, q_slots, k_slots) & (segments != 0)[:, None, None, None, :]


def attention_impl(name: str, dtype, head_dim: int, platform, seq_len: int = 0, segments_only: bool = False) -> str:
  """config.model.attention -> the implementation of a training self-attention: "xla", "cudnn" or "splash".

  "auto" picks the Pallas splash kernel on TPUs (model/splash.py: no [t, t] scores in HBM) and
  cuDNN's fused attention on NVIDIA GPUs when it applies (bf16/fp16 compute, head_dim a multiple of
  8 up to 128): on one H100, a llama3_1b train step (bf16, seq 2048, batch 2) took 86 ms with it
  against 138 ms with the einsum path (40% vs 25% MFU). Elsewhere (CPU, fp32 on GPUs) the einsum
  path, which XLA fuses well there. `platform` is that of the devices the step is compiled for
  (`sharding.mesh_platform()`: "gpu", "cpu", "tpu", or None outside a mesh, which gets the einsum
  path that lowers everywhere). Splash ("auto" on a TPU, or asked for by name; off a TPU it runs
  interpreted) needs a mask of segment ids alone (`segments_only`: no preference-pair branches,
  which only a dense mask expresses) and rows of a multiple of 128 tokens; otherwise the einsum path."""
  if name == "splash" or (name == "auto" and platform == "tpu"):
    return "splash" if segments_only and splash.fits(seq_len) else "xla"
  if name != "auto":
    return name
  fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if fits and platform == "gpu" else "xla"


def grouped_attention(q, k, v, mask, impl: str = "xla", causal: bool = False):
  """q [b, t, kv, group, hd], k/v [b, s, kv, hd], mask [b, 1, 1, t, s] -> [b, t, kv, group, hd].

  causal: `mask` hides every key after its query (t == s), so cuDNN may skip those tiles
  (is_causal with the mask: on one H100, a llama3_1b layer's attention forward + backward 2.24 ->
  1.67 ms and its train step 155 -> 146 ms, the same loss)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  if impl == "cudnn":
    b, t, kv, g, hd = q.shape
    out = jax.nn.dot_product_attention(
        q.reshape(b, t, kv * g, hd), k, v, mask=mask.reshape(b, 1, t, -1), scale=scale,
        is_causal=causal, implementation="cudnn")
    return out.reshape(b, t, kv, g, hd)
  # Softmax with the scale folded into q and the normalisation deferred to the output: the
  # division runs on [.., t, hd] instead of [.., t, s] (the flash-attention order; +4-5% per
  # train step on CPU). Fully masked rows (padding) get uniform weights, never NaN.
  scores = jnp.einsum("btkgh,bskh->bkgts", q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)                       # [b, kv, g, t, s]
  scores = jnp.where(mask, scores, NEG_INF)
  w = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, -1, keepdims=True)))
  out = jnp.einsum("bkgts,bskh->btkgh", w.astype(v.dtype), v)                   # [b, t, kv, g, hd]
  denom = jnp.sum(w, -1).transpose(0, 3, 1, 2)[..., None]                       # [b, t, kv, g, 1]
  return (out.astype(jnp.float32) / denom).astype(v.dtype)


MAX_QUERY_BLOCKS = 8  # causal_attention: at most this many query blocks (compile time), each >= 64


def causal_attention(q, k, v, mask, impl: str = "xla"):
  """grouped_attention of a causal self-attention mask, skipping the keys after each query block.

  Shapes as grouped_attention (t == s). The queries split into n <= MAX_QUERY_BLOCKS blocks of
  >= 64; block i attends only to keys [0, end of block i), since `mask` is causal and hides the
  rest anyway: the same result with (n + 1) / 2n of the score work (62% at n = 4, 56% at n = 8).
  On CPU the attention forward + backward of a `medium` layer drops from ~147 to ~77 ms. impl
  "splash" takes the segment ids [b, t] as its mask and runs model/splash.py instead."""
  if impl == "splash":
    return splash.attention(q, k, v, mask)  # mask: segment ids [b, t] (`training_mask`)
  t = q.shape[1]
  n = min(MAX_QUERY_BLOCKS, t // 64)
  if impl != "xla" or n < 2:
    return grouped_attention(q, k, v, mask, impl, causal=True)
  ends = [round(t * (i + 1) / n) for i in range(n)]
  starts = [0] + ends[:-1]
  return jnp.concatenate([grouped_attention(q[:, a:e], k[:, :e], v[:, :e], mask[..., a:e, :e])
                          for a, e in zip(starts, ends)], axis=1)


def cached_attention(q, k_cache, v_cache, mask):
  """q [b, t, kv, group, hd] against a whole KV cache k/v [b, kv, T, hd] -> [b, t, kv, group, hd].

  mask [b, 1, 1, t, T] (`cache_mask`). One new token per row (t == 1, every decode step) runs
  as [b, kv, group, T] scores with no length axis."""
  b, t, kv, g, hd = q.shape
  scale = 1.0 / math.sqrt(hd)
  k_cache, v_cache = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
  if t == 1:
    scores = jnp.einsum("bkgh,bksh->bkgs", q[:, 0], k_cache, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask[:, :, :, 0], scores, NEG_INF), -1).astype(q.dtype)  # [b, kv, g, T]
    return jnp.einsum("bkgs,bksh->bkgh", probs, v_cache)[:, None]                          # [b, 1, kv, g, hd]
  scores = jnp.einsum("btkgh,bksh->bkgts", q, k_cache, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1).astype(q.dtype)       # [b, kv, g, t, T]
  return jnp.einsum("bkgts,bksh->btkgh", probs, v_cache)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE.

  x [batch, t, d]; cos_sin: `rope_cos_sin` of the tokens' positions, computed once for all layers;
  mask [batch, 1, 1, t, s]: `training_mask` (s = t; the segment ids [batch, t] where splash runs) or
  `cache_mask` (decoding, s = T); on a mesh whose `sequence` axis splits the rows (training only),
  (segment_ids, branch_ids or None) [batch, t], from which model/context_parallel.py builds the
  mask block by block.
  `cache` (decoding only) is this layer's k, v [batch, kv_heads, T, head_dim] plus `index`, the
  slot of the first new token. Returns (output [batch, t, d], updated {k, v} or None)."""
  cfg: "ModelConfig"  # noqa: F821 (model/transformer.py, which imports this module)

  @nn.compact
  def __call__(self, x, cos_sin, mask, cache=None):
    cfg = self.cfg
    kv, group, hd = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    qkv = dense(self, "qkv", x, 1, (cfg.d_model, kv, group + 2, hd),
                ("embed", "kv_heads", "qkv", "head_dim"), cfg)   # [b, t, kv, group+2, hd]
    if cfg.qkv_bias:
      bias = self.param(
          "qkv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads", "qkv", "head_dim")),
          (kv, group + 2, hd), cfg.param_dtype)
      qkv = qkv + bias.astype(cfg.dtype)
    qkv = sharding.constrain(qkv, ("batch", "length", "act_kv_heads", None, None))
    qkv = checkpoint_name(qkv, "qkv_proj")                      # remat names: model/transformer.py
    qk = apply_rope(qkv[:, :, :, :group + 1], *cos_sin)        # q heads and k in one rotation
    q, k = qk[:, :, :, :group], qk[:, :, :, group]             # [b, t, kv, group, hd], [b, t, kv, hd]
    v = qkv[:, :, :, group + 1]                                 # [b, t, kv, hd]

    if cache is None and sharding.mesh_axis_size("sequence") > 1:
      out, new_cache = checkpoint_name(context_parallel.attention(q, k, v, *mask), "context"), None
    elif cache is None:
      platform = sharding.mesh_platform()  # segment ids for a mask: training_mask chose splash
      impl = "splash" if mask.ndim == 2 else attention_impl(cfg.attention, cfg.dtype, hd, platform)
      out, new_cache = causal_attention(q, k, v, mask, impl), None
      if impl != "splash":  # the kernel names its own output and logsumexp so (model/splash.py)
        out = checkpoint_name(out, "context")
    else:
      write = lambda buf, new: jax.lax.dynamic_update_slice(
          buf, new.transpose(0, 2, 1, 3).astype(buf.dtype), (0, 0, cache["index"], 0))
      new_cache = dict(k=write(cache["k"], k), v=write(cache["v"], v))  # [b, kv, T, hd] each
      out = cached_attention(q, new_cache["k"], new_cache["v"], mask)

    y = dense(self, "out", out, 3, (kv, group, hd, cfg.d_model), ("kv_heads", "q_group", "head_dim", "embed"),
              cfg)   # [b, t, d]
    return checkpoint_name(sharding.constrain(y, ("batch", "length", "act_embed")), "out_proj"), new_cache
