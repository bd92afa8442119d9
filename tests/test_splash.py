"""The Pallas splash-attention path (model/splash.py): its numbers against a float64 NumPy attention
(Pallas interpret mode on the CPU), the same model through it and through the einsum path on a
sharded mesh, its choice by `model.attention`, and its kernels in the train step compiled for a
TPU slice."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models, pretrain_tiny
from model import sharding, splash
from model.attention import attention_impl, grouped_attention
from model.transformer import REMAT_POLICIES, ModelConfig, Transformer
from train import aot, topology

pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")


def packed_segments(rng, b, t):
  """[b, t] ids of random-length documents, ending in padding (0) on some rows."""
  rows = []
  for _ in range(b):
    ends = np.sort(rng.choice(np.arange(1, t), 3, replace=False))
    row = np.searchsorted(ends, np.arange(t), side="right") + 1  # documents 1..4
    row[ends[-1] + rng.integers(0, t - ends[-1]):] = 0
    rows.append(row)
  return np.stack(rows).astype(np.int32)


def numpy_attention(q, k, v, seg, dout):
  """float64: out [b, t, kv, g, hd] and the gradients of sum(out * dout) for q, k, v (causal by
  slot, same segment id; the backward pass written out: dS = P * (dP - rowsum(dP * P)))."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  t, scale = q.shape[1], 1 / math.sqrt(q.shape[-1])
  allowed = (seg[:, :, None] == seg[:, None, :]) & np.tri(t, dtype=bool)[None]        # [b, t, s]
  s = np.einsum("btkgh,bskh->bkgts", q, k) * scale
  s = np.where(allowed[:, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)                                                        # [b, kv, g, t, s]
  out = np.einsum("bkgts,bskh->btkgh", p, v)
  dp = np.einsum("btkgh,bskh->bkgts", dout, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bkgts,bskh->btkgh", ds, k) * scale
  dk = np.einsum("bkgts,btkgh->bskh", ds, q) * scale
  dv = np.einsum("bkgts,btkgh->bskh", p, dout)
  return out, (dq, dk, dv)


def test_splash_matches_float64_attention_with_packed_documents_and_gqa():
  """t = 384: three 128-token tiles per side (documents and padding cross tile edges, the upper
  tiles are skipped); 2 kv heads x 3 queries each; forward and all three gradients."""
  rng = np.random.default_rng(0)
  b, t, kv, g, hd = 2, 384, 2, 3, 64
  assert splash.block_sizes(t).block_q == 128
  q = jnp.asarray(rng.standard_normal((b, t, kv, g, hd)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, t, kv, hd)), jnp.float32) for _ in range(2))
  seg, dout = packed_segments(rng, b, t), rng.standard_normal((b, t, kv, g, hd))
  out, vjp = jax.vjp(lambda q, k, v: splash.attention(q, k, v, jnp.asarray(seg)), q, k, v)
  grads = vjp(jnp.asarray(dout, jnp.float32))
  want_out, want_grads = numpy_attention(q, k, v, seg, dout)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-4, atol=1e-4)
  for name, got, want in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-4, err_msg=name)
  # and the einsum path, the same masks as a dense [b, 1, 1, t, t] mask
  dense = ((seg[:, :, None] == seg[:, None, :]) & np.tri(t, dtype=bool))[:, None, None]
  np.testing.assert_allclose(np.asarray(grouped_attention(q, k, v, jnp.asarray(dense))), want_out,
                             rtol=1e-4, atol=1e-4)


def test_attention_auto_is_splash_on_a_tpu_where_the_mask_is_segment_ids():
  assert attention_impl("auto", jnp.bfloat16, 128, "tpu", 8192, segments_only=True) == "splash"
  assert attention_impl("auto", jnp.bfloat16, 128, "tpu", 8192, segments_only=False) == "xla"  # pairs' branches
  assert attention_impl("auto", jnp.bfloat16, 128, "tpu", 200, segments_only=True) == "xla"    # not 128-tiled
  assert attention_impl("auto", jnp.float32, 128, "cpu", 8192, segments_only=True) == "xla"
  assert attention_impl("splash", jnp.float32, 128, "cpu", 256, segments_only=True) == "splash"  # interpreted
  assert attention_impl("auto", jnp.bfloat16, 128, "gpu", 8192, segments_only=True) == "cudnn"


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "qkv_context"])
def test_the_model_on_a_sharded_mesh_gives_the_einsum_paths_loss_and_gradients(remat):
  """Rows over (data, fsdp), kv heads over tensor: the kernel runs per shard under shard_map."""
  cfg_x = ModelConfig.from_config(dict(models.tiny(), attention="xla", remat=remat))
  cfg_s = ModelConfig.from_config(dict(models.tiny(), attention="splash", remat=remat))
  rng = np.random.default_rng(1)
  b, t = 4, 128
  tokens = jnp.asarray(rng.integers(0, cfg_x.vocab_size, (b, t)), jnp.int32)
  seg = packed_segments(rng, b, t)
  starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1) != 0, np.arange(t), 0), 1)
  positions = jnp.asarray(np.arange(t) - starts, jnp.int32)  # restart at 0 per document
  params = nn.meta.unbox(Transformer(cfg_x).init(jax.random.key(0), tokens))["params"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

  def loss(cfg):
    def f(p):
      logits = Transformer(cfg).apply({"params": p}, tokens, positions, jnp.asarray(seg))
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
    return jax.jit(jax.value_and_grad(f))

  with sharding.use_mesh(mesh):
    assert "pallas_call" in str(jax.make_jaxpr(loss(cfg_s))(params))
    (lx, gx), (ls, gs) = loss(cfg_x)(params), loss(cfg_s)(params)
  assert abs(float(lx) - float(ls)) < 1e-5
  for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(gx), jax.tree.leaves(gs)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=2e-4, atol=2e-6, err_msg=str(path))


KERNELS = ("splash_mha_fwd_segmented", "splash_mha_dq_segmented", "splash_mha_dkv_segmented")


def test_the_tiny_train_step_compiled_for_v5p_runs_the_splash_kernels():
  """attention=auto on a TPU mesh (kv heads over tensor): the forward, dq and dkv kernels are the
  compiled step's three Mosaic calls; `context` remat keeps the forward kernel out of the
  backward pass, full remat runs it again there; attention=xla runs none."""
  c = pretrain_tiny.get_config()
  c.model.dtype, c.model.remat, c.model.scan_layers = "bfloat16", "context", True
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 2
  mesh = sharding.make_mesh(c.mesh, topology.devices("v5p-8"))
  kernels = lambda text: [text.count(f'kernel_name = "{name}') for name in KERNELS]  # calls in a lowering
  lowered = aot.lower_train_step(c, mesh)[0]
  text = lowered.compile().as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 3 and all(k in text for k in KERNELS)
  assert kernels(lowered.as_text()) == [1, 1, 1]
  c.model.remat = "full"
  assert kernels(aot.lower_train_step(c, mesh)[0].as_text()) == [2, 1, 1]
  c.model.attention = "xla"
  assert kernels(aot.lower_train_step(c, mesh)[0].as_text()) == [0, 0, 0]


def test_remat_policies_are_the_validated_names():
  from train import validate
  c = pretrain_tiny.get_config()
  for name in ("none",) + tuple(REMAT_POLICIES):
    c.model.remat = name
    validate.validate(c, 1)


def test_bf16_splash_matches_float64_through_its_precision_wrapper():
  """bf16 operands go through model/splash.py's default-precision custom_vjp (the compile under the
  tests' "highest" it exists for is the v5p test's): forward and gradients agree with float64 to
  bf16's resolution."""
  rng = np.random.default_rng(3)
  b, t, kv, g, hd = 1, 128, 1, 2, 32
  q = rng.standard_normal((b, t, kv, g, hd))
  k, v = rng.standard_normal((b, t, kv, hd)), rng.standard_normal((b, t, kv, hd))
  seg, dout = packed_segments(rng, b, t), rng.standard_normal((b, t, kv, g, hd))
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  out, vjp = jax.vjp(lambda q, k, v: splash.attention(q, k, v, jnp.asarray(seg)), bf(q), bf(k), bf(v))
  want_out, want_grads = numpy_attention(*(np.asarray(bf(x), np.float64) for x in (q, k, v)), seg, dout)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=3e-2)
  for name, got, want in zip("qkv", vjp(bf(dout)), want_grads):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=6e-2 * np.abs(want).max(), err_msg=name)
