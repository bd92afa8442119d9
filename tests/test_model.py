"""The decoder against an independent float64 NumPy forward pass, causality, packing, caching."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from model.attention import attention_mask, causal_attention, grouped_attention, rope_frequencies
from model.transformer import ModelConfig, Transformer, init_cache


def make(**overrides):
  cfg = ModelConfig.from_config(dict(models.tiny(), **overrides))
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens))["params"]
  # random, non-trivial norms and biases so a wrong formula cannot hide behind ones and zeros
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
      if ("scale" in str(p) or "bias" in str(p)) else x, params)
  return cfg, model, params, tokens


def numpy_forward(cfg, params, tokens, positions, segments):
  """float64 reference: plain multi-head attention with k/v heads repeated for GQA."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  group, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)

  def rope(x):  # x [b, t, heads, hd]
    ang = positions[:, :, None, None] * inv
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)

  x = p["embedding"][tokens]
  b, t = tokens.shape
  allowed = (segments[:, :, None] == segments[:, None, :]) & (np.arange(t)[:, None] >= np.arange(t)[None, :])
  for i in range(cfg.n_layers):
    L = p[f"layer_{i}"]
    h = rms(x, L["attn_norm"]["scale"])
    w = L["attn"]["qkv"]  # [d, kv, group + 2, hd]
    bias = L["attn"].get("qkv_bias", np.zeros(w.shape[1:]))
    wq = w[:, :, :group].reshape(cfg.d_model, cfg.n_heads, hd)   # head = kv * group + g
    bq = bias[:, :group].reshape(cfg.n_heads, hd)
    wk, wv = np.repeat(w[:, :, group], group, axis=1), np.repeat(w[:, :, group + 1], group, axis=1)
    bk, bv = np.repeat(bias[:, group], group, axis=0), np.repeat(bias[:, group + 1], group, axis=0)
    q = rope(np.einsum("btd,dhe->bthe", h, wq) + bq)
    k = rope(np.einsum("btd,dhe->bthe", h, wk) + bk)
    v = np.einsum("btd,dhe->bthe", h, wv) + bv
    s = np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(hd)
    s = np.where(allowed[:, None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhe->bqhe", a, v).reshape(b, t, cfg.n_heads * hd)
    x = x + o @ L["attn"]["out"].reshape(cfg.n_heads * hd, cfg.d_model)
    h = rms(x, L["mlp_norm"]["scale"])
    gu = np.einsum("btd,dcm->btcm", h, L["mlp"]["gate_up"])
    g = gu[:, :, 0]
    x = x + (g / (1 + np.exp(-g)) * gu[:, :, 1]) @ L["mlp"]["down"]
  h = rms(x, p["final_norm"]["scale"])
  return h @ (p["embedding"].T if cfg.tie_embeddings else p["lm_head"])


@pytest.mark.parametrize("overrides", [
    dict(n_kv_heads=2),                       # grouped-query attention
    dict(n_kv_heads=4),                       # kv_heads == heads: plain multi-head attention
    dict(n_kv_heads=1, qkv_bias=True, tie_embeddings=True),
])
def test_matches_numpy_reference(overrides):
  cfg, model, params, tokens = make(**overrides)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  segments = np.ones(tokens.shape, np.int32)
  got = model.apply({"params": params}, tokens)
  want = numpy_forward(cfg, params, np.asarray(tokens), positions, segments)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_causal_future_tokens_do_not_change_the_past():
  cfg, model, params, tokens = make()
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % cfg.vocab_size)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
  assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


def test_packed_documents_do_not_see_each_other():
  cfg, model, params, tokens = make()
  doc_a, doc_b = tokens[:1, :5], tokens[1:, :7]
  packed = jnp.concatenate([doc_a, doc_b], axis=1)                     # [1, 12]
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  out = model.apply({"params": params}, packed, positions, segments)
  alone_a = model.apply({"params": params}, doc_a)
  alone_b = model.apply({"params": params}, doc_b)
  np.testing.assert_allclose(out[:, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], alone_b, atol=1e-5)
  want = numpy_forward(cfg, params, np.asarray(packed), np.asarray(positions), np.asarray(segments))
  np.testing.assert_allclose(out, want, atol=2e-4, rtol=2e-4)


def test_long_packed_row_matches_numpy_reference():
  """t = 200 >= 128: attention runs in causal query blocks (model/attention.py causal_attention)."""
  cfg, model, params, _ = make(n_kv_heads=2)
  rng = np.random.default_rng(3)
  lengths = [70, 90, 40]
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 200)), jnp.int32)
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  out = model.apply({"params": params}, tokens, jnp.asarray(positions), jnp.asarray(segments))
  want = numpy_forward(cfg, params, np.asarray(tokens), positions, segments)
  np.testing.assert_allclose(out, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("t", [128, 200, 600])
def test_causal_blocks_equal_full_attention_values_and_gradients(t):
  """Skipping the keys after each query block changes nothing: values and gradients of the
  packed, branched (DPO-style) mask match the unblocked computation."""
  rng = np.random.default_rng(t)
  b, kv, g, hd = 2, 2, 2, 8
  q, ct = (jnp.asarray(rng.standard_normal((b, t, kv, g, hd)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((b, t, kv, hd)), jnp.float32) for _ in range(2))
  cut = [t // 5, t // 2, (3 * t) // 4]
  segments = jnp.asarray(np.stack([np.where(np.arange(t) < cut[0], 1, 2), np.ones(t, int)]), jnp.int32)
  branches = jnp.asarray(np.stack([np.zeros(t, int), np.digitize(np.arange(t), cut[1:])]), jnp.int32)
  slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = attention_mask(segments, segments, slots, slots, branches)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, mask) * ct)
  got = jax.value_and_grad(loss(causal_attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.value_and_grad(loss(grouped_attention), argnums=(0, 1, 2))(q, k, v)
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, w, atol=2e-4, rtol=1e-4)


def test_cached_decoding_matches_full_forward():
  cfg, model, params, tokens = make()
  full = model.apply({"params": params}, tokens)
  cache = init_cache(cfg, 2, 16)
  logits, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
  steps = [logits]
  for i in range(5, tokens.shape[1]):
    logits, cache = model.apply({"params": params}, tokens[:, i:i + 1], jnp.full((2, 1), i), cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)


def test_scan_over_layers_equals_unrolled_layers():
  cfg, model, params, tokens = make()
  scfg = ModelConfig.from_config(dict(models.tiny(), scan_layers=True, remat="full"))
  layers = [params[f"layer_{i}"] for i in range(cfg.n_layers)]
  stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
  stacked["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
  got = Transformer(scfg).apply({"params": stacked}, tokens)
  np.testing.assert_allclose(got, model.apply({"params": params}, tokens), atol=1e-5)


def test_offloaded_layer_inputs_give_the_same_gradients():
  """remat=offload (scanned layers' inputs kept in host memory for the backward pass) changes
  where an array lives, not the gradient: the same as remat=full's, and as the unrolled model's
  up to float32 summation order."""
  cfg, model, params, tokens = make()
  layers = [params[f"layer_{i}"] for i in range(cfg.n_layers)]
  stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
  stacked["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, tokens)))
  grad = lambda remat: jax.jit(jax.grad(loss(Transformer(ModelConfig.from_config(
      dict(models.tiny(), scan_layers=True, remat=remat))))))(stacked)
  got, full = grad("offload"), grad("full")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  want = jax.grad(loss(model))(params)
  np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=1e-3, atol=2e-4)
  for i in range(cfg.n_layers):
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], got["layers"]["block"])),
                    jax.tree.leaves(want[f"layer_{i}"])):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)


def test_llama3_rope_scaling_formula():
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)
  got = np.asarray(rope_frequencies(128, 500_000.0, scaling))
  inv = 1.0 / 500_000.0 ** (np.arange(0, 128, 2) / 128)
  want = []
  for f in inv:  # the published piecewise rule, written out per frequency
    wavelen = 2 * math.pi / f
    if wavelen < 8192 / 4.0:
      want.append(f)
    elif wavelen > 8192 / 1.0:
      want.append(f / 8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      want.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert not np.allclose(got, inv)  # scaling actually changed something


def test_parameter_count_matches_tree():
  for name in ("tiny", "small"):
    cfg = ModelConfig.from_config(models.get(name))
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes))) == cfg.num_params()


def test_attention_auto_picks_cudnn_only_on_gpu_in_half_precision():
  from model import attention
  assert attention.attention_impl("auto", jnp.bfloat16, 64, "cpu") == "xla"
  assert attention.attention_impl("auto", jnp.bfloat16, 64, None) == "xla"     # no mesh: lowers anywhere
  assert attention.attention_impl("auto", jnp.bfloat16, 128, "gpu") == "cudnn"
  assert attention.attention_impl("auto", jnp.float16, 64, "gpu") == "cudnn"
  assert attention.attention_impl("auto", jnp.float32, 64, "gpu") == "xla"    # cuDNN has no fp32 kernel
  assert attention.attention_impl("auto", jnp.bfloat16, 256, "gpu") == "xla"  # head_dim over 128
  assert attention.attention_impl("auto", jnp.bfloat16, 64, "tpu") == "xla"
  assert attention.attention_impl("xla", jnp.bfloat16, 64, "gpu") == "xla"    # an explicit choice stays


def test_mesh_platform_is_that_of_the_devices_being_compiled_for():
  from model import sharding
  seen = []
  record = lambda x: seen.append(sharding.mesh_platform()) or x
  with sharding.use_mesh(sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])):
    jax.make_jaxpr(record)(1.0)
  jax.make_jaxpr(record)(1.0)
  assert seen == ["cpu", None]


def count_dots(f, *args, platform: str) -> int:
  """dot_general ops in f's program lowered for `platform` (on this host, whatever it is)."""
  text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return text.count("stablehlo.dot_general")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_cpu_kernels_are_chosen_when_lowering_not_by_the_host(platform):
  """The blocked LM head, RoPE's identity matmul and the matrix-vector row sums are what a program
  lowered for the CPU gets; the same train step and sampler lowered on this CPU host for a GPU or
  TPU (ahead of time, as for a TPU topology) get one LM-head dot, cos/sin as computed and a plain
  sum. The model code never asks which backend the host has."""
  from model import lm_head, sampling
  cfg, model, params, _ = make(vocab_size=2500)            # 3 vocabulary blocks on CPU
  tokens = jnp.zeros((2, 128), jnp.int32)                  # 256 rows: the blocked head applies

  def step(params, tokens):
    loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens))[..., 0])
    grads = jax.grad(loss)(params)
    return sampling.row_sums(model.apply({"params": params}, tokens[:, :1])[:, 0]), grads

  blocks = len(lm_head._blocks(cfg.vocab_size))
  # RoPE: 1 per forward pass (2); row sums: 1; LM head: blocks - 1 more in the forward and in the weight
  # gradient of the 256-row pass (the 2-row one is a plain dot on every platform)
  extra = 2 + 1 + 2 * (blocks - 1)
  cpu_dots = count_dots(step, params, tokens, platform="cpu")
  assert cpu_dots - count_dots(step, params, tokens, platform=platform) == extra
  # and the CPU program runs: blocked and plain give the same numbers
  got, _ = jax.jit(step)(params, tokens)
  want = jnp.sum(model.apply({"params": params}, tokens[:, :1])[:, 0], -1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_blocked_lm_head_matches_float64_values_and_gradients(tied):
  from model import lm_head
  rng = np.random.default_rng(3)
  b, t, d, v = 2, 150, 24, 2500  # 300 rows (blocked path); 2500 = 1024 + 1024 + 452 columns
  h = rng.normal(size=(b, t, d))
  kernel = rng.normal(size=(v, d) if tied else (d, v))
  g = rng.normal(size=(b, t, v))
  f = lambda h, k: jnp.sum(lm_head.logits(h, k, tied) * g)
  out = lm_head.logits(jnp.asarray(h, jnp.float32), jnp.asarray(kernel, jnp.float32), tied)
  dh, dk = jax.grad(f, argnums=(0, 1))(jnp.asarray(h, jnp.float32), jnp.asarray(kernel, jnp.float32))
  w = kernel.T if tied else kernel                        # float64 reference: y = h @ w
  np.testing.assert_allclose(out, h @ w, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dh, g @ w.T, rtol=1e-4, atol=1e-4)
  dw = np.einsum("btd,btv->dv", h, g)
  np.testing.assert_allclose(dk, dw.T if tied else dw, rtol=1e-4, atol=1e-4)
  assert len(lm_head._blocks(v)) == 3


def test_cudnn_attention_is_told_the_mask_is_causal(monkeypatch):
  """The cuDNN path passes is_causal=True with the packed / branched mask (so it can skip the tiles
  after the diagonal). Run here through jax.nn.dot_product_attention's XLA path with the same
  arguments: the mask and the causal flag together give the mask's own attention."""
  calls = []
  real = jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kw):
    calls.append(kw)
    return real(*args, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  rng = np.random.default_rng(3)
  b, t, kv, g, hd = 2, 96, 2, 2, 16
  q, k, v = (jnp.asarray(rng.standard_normal(s).astype(np.float32))
             for s in ((b, t, kv, g, hd), (b, t, kv, hd), (b, t, kv, hd)))
  seg = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1))
  branches = jnp.asarray(np.where(np.arange(t) < 40, 0, np.where(np.arange(t) < 70, 1, 2))[None].repeat(b, 0))
  slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = attention_mask(seg, seg, slots, slots, branches)
  got = causal_attention(q, k, v, mask, impl="cudnn")
  assert calls and all(c["is_causal"] for c in calls) and all(c["mask"] is not None for c in calls)
  np.testing.assert_allclose(np.asarray(got), np.asarray(grouped_attention(q, k, v, mask)), rtol=2e-5, atol=2e-5)
