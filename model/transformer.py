"""The Llama-family decoder: embed -> N x (RMSNorm, GQA attention, RMSNorm, SwiGLU) -> norm -> logits.

Pure Flax linen: `model.init(rng, tokens)` / `model.apply({"params": p}, tokens, ...)`. Every
parameter carries logical axis names (see model/sharding.py for how they map onto the mesh).
The one forward pass of the project: training, scoring, and decoding with a KV cache (a prefill
of many tokens, then steps of one) all run it.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from model import lm_head, sharding
from model.attention import Attention, cache_mask, rope_cos_sin, rope_frequencies, training_mask
from model.dense import dense


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: Optional[tuple] = None  # ((key, value), ...) of the Llama-3 scaling, or None
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_embeddings: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"  # "none" or a key of REMAT_POLICIES
  attention: str = "auto"  # model/attention.py attention_impl
  init_std: float = 0.02

  @classmethod
  def from_config(cls, c) -> "ModelConfig":
    """Builds the frozen model config from `config.model` (a ConfigDict or dict)."""
    c = dict(c)
    scaling = dict(c.pop("rope_scaling", {}) or {})
    head_dim = c.pop("head_dim", 0) or c["d_model"] // c["n_heads"]
    return cls(
        head_dim=head_dim,
        rope_scaling=tuple(sorted(scaling.items())) if scaling.get("factor", 0) > 0 else None,
        dtype=jnp.dtype(c.pop("dtype", "float32")),
        param_dtype=jnp.dtype(c.pop("param_dtype", "float32")),
        **c)

  def num_params(self, embeddings: bool = True) -> int:
    """Parameter count (embedding and lm-head included unless embeddings=False)."""
    group = self.n_heads // self.n_kv_heads
    attn = self.d_model * self.n_kv_heads * (group + 2) * self.head_dim + self.n_heads * self.head_dim * self.d_model
    attn += self.n_kv_heads * (group + 2) * self.head_dim if self.qkv_bias else 0
    block = attn + 3 * self.d_model * self.mlp_dim + 2 * self.d_model
    total = self.n_layers * block + self.d_model
    if embeddings:
      total += self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return total

  def train_flops_per_token(self, seq_len: int, frozen_weights: bool = False) -> float:
    """6 * non-embedding params + 6 * lm head + 12 * layers * d * seq (docs/performance.md).

    frozen_weights (LoRA over a frozen base): no weight gradients, so 4 per weight instead of 6
    (forward and the activations' gradient); the adapters' own 6 per parameter are the caller's."""
    per_weight = 4 if frozen_weights else 6
    return (per_weight * (self.num_params(embeddings=False) + self.vocab_size * self.d_model)
            + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class Mlp(nn.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up)); gate and up are one [embed, 2, mlp] kernel."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = dense(self, "gate_up", x, 1, (cfg.d_model, 2, cfg.mlp_dim), ("embed", "gate_up", "mlp"), cfg)  # [b, t, 2, mlp]
    h = sharding.constrain(h, ("batch", "length", None, "act_mlp"))
    h = nn.silu(h[:, :, 0]) * h[:, :, 1]
    y = dense(self, "down", h, 1, (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), cfg)  # [b, t, d]
    return sharding.constrain(y, ("batch", "length", "act_embed"))


class Block(nn.Module):
  """x [b, t, d] -> (x [b, t, d], new layer cache or None); cos_sin, mask, cache as `Attention`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos_sin, mask, cache=None):
    cfg = self.cfg
    x = checkpoint_name(x, "layer_input")  # what remat=offload keeps in host memory
    h = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="attn_norm")(x)
    a, new_cache = Attention(cfg, name="attn")(h, cos_sin, mask, cache)
    x = x + a
    x = x + Mlp(cfg, name="mlp")(RMSNorm(cfg.norm_eps, cfg.param_dtype, name="mlp_norm")(x))
    return x, new_cache


class ScannedBlock(nn.Module):
  """Block with the (carry, per-layer input) signature nn.scan needs."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, layer_cache, cos_sin, mask, index):
    cache = None if layer_cache is None else dict(layer_cache, index=index)
    return Block(self.cfg, name="block")(x, cos_sin, mask, cache)


_save = jax.checkpoint_policies.save_only_these_names

# config.model.remat -> what the backward pass of a layer keeps from its forward ("none": all of it,
# no remat). Everything not kept is recomputed from the layer's input. Names (model/attention.py):
# "qkv_proj" the fused q/k/v projection [b, t, kv, group + 2, hd]; "context" the attention output
# [b, t, kv, group, hd] (with the splash kernel also its logsumexp [b, heads, t] fp32, both saved
# under that name by the kernel); "out_proj" the attention block's output [b, t, d]. Per layer and
# row of 8192 tokens of llama3_70b in bf16: 160, 128 and 128 MiB (+ 2 MiB logsumexp). "offload":
# only the layer's input ("layer_input"), moved to host memory (TPU / GPU) until the backward pass
# needs it (scanned layers: [layers, b, t, d] off the chip, e.g. 8 GiB per v5p chip for
# pretrain_llama3_8b).
REMAT_POLICIES = {
    "full": None,                          # only the layer's input: the whole layer runs again
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # every weight matmul's output
    "context": _save("context"),           # the attention kernel's forward is not run again
    "qkv_context": _save("qkv_proj", "context"),              # nor the q/k/v projection
    "attention": _save("qkv_proj", "context", "out_proj"),    # only the MLP half runs again
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host"),
}


def _maybe_remat(module, cfg: ModelConfig):
  if cfg.remat == "none":
    return module
  return nn.remat(module, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  """Decoder-only LM.

  tokens, positions, segment_ids: [batch, len] int32. positions restart at 0 per packed document;
  segment_ids differ between documents of a row (0 = padding) so attention never crosses them.
  branch_ids [batch, len] (optional, training only): shared trunk 0, branches 1, 2, ... that see
  the trunk but not each other (model/attention.py `attention_mask`).
  cache (decoding): from `init_cache`; the tokens are written at its `index` and attend to
  everything before them there (a prefill of the prompt, then one token per step).
  Returns logits [batch, len, vocab] (fp32), followed by the final hidden states [batch, len, d] if
  return_hidden and by the new cache when decoding: logits, (logits, hidden), (logits, cache) or
  (logits, hidden, cache). With head=False, logits is None. logit_slots [batch, k] int32 (or a
  slice of positions): the lm head runs only on the hidden states of those slots, and logits is
  [batch, k, vocab] (hidden stays [batch, len, d]).
  RoPE angles and the attention mask are computed once here, for all layers.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None,
               return_hidden: bool = False, head: bool = True, branch_ids=None, logit_slots=None):
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
    x = jnp.take(embedding.astype(cfg.dtype), tokens, axis=0)  # [b, t, d]; its gradient in cfg.dtype, like the kernels
    x = sharding.constrain(x, ("batch", "length", "act_embed"))

    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))
    cos_sin = rope_cos_sin(positions, inv_freq)  # 2 x [b, t, head_dim / 2]
    if cache is None and sharding.mesh_axis_size("sequence") > 1:  # rows split: model/context_parallel.py
      index, mask = None, (segment_ids, branch_ids)
    elif cache is None:
      index = None
      mask = training_mask(cfg, segment_ids, branch_ids)  # [b, 1, 1, t, t], or [b, t] for splash
    else:
      index = cache["index"]
      segments = jax.lax.dynamic_update_slice(cache["segments"], segment_ids, (0, index))  # [b, T]
      mask = cache_mask(segment_ids, segments, index)                                     # [b, 1, 1, t, T]

    if cfg.scan_layers:
      stack = nn.scan(_maybe_remat(ScannedBlock, cfg), variable_axes={"params": 0},
                      split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, layer_caches = stack(cfg, name="layers")(
          x, None if cache is None else cache["layers"], cos_sin, mask, index)
    else:
      layer_caches = []
      for i in range(cfg.n_layers):
        layer_cache = None if cache is None else dict(cache["layers"][i], index=index)
        x, new = _maybe_remat(Block, cfg)(cfg, name=f"layer_{i}")(x, cos_sin, mask, layer_cache)
        layer_caches.append(new)

    hidden = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x)  # [b, t, d]
    logits = None
    if head:
      if logit_slots is None:
        h = hidden
      elif isinstance(logit_slots, slice):
        h = hidden[:, logit_slots]
      else:
        h = jnp.take_along_axis(hidden, logit_slots[..., None], 1)  # [b, k, d]
      kernel = embedding if cfg.tie_embeddings else self.param(
          "lm_head", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), cfg.param_dtype)
      logits = lm_head.logits(h, kernel.astype(cfg.dtype), cfg.tie_embeddings)
      logits = sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    outputs = (logits,) + ((hidden,) if return_hidden else ())
    if cache is not None:
      outputs += (dict(layers=layer_caches, segments=segments, index=index + t),)
    return outputs if len(outputs) > 1 else logits


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache: per layer k, v [batch, kv_heads, max_len, head_dim] (stacked [layers, ...]
  when scan_layers), segments [batch, max_len] (0 = empty or padding) and index (next slot)."""
  dtype = dtype or cfg.dtype
  shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
  if cfg.scan_layers:
    layers = dict(k=jnp.zeros((cfg.n_layers,) + shape, dtype), v=jnp.zeros((cfg.n_layers,) + shape, dtype))
  else:
    layers = [dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]
  return dict(layers=layers, segments=jnp.zeros((batch, max_len), jnp.int32), index=jnp.array(0, jnp.int32))
