"""Context parallelism: rows split over the `sequence` mesh axis give the unsharded model's attention,
loss and gradients (8 fake CPU devices), and the step moves key/value blocks, never a whole row."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import grpo_arith, models, pretrain_tiny
from configs.errors import UserError
from model import attention, context_parallel, sharding
from model.transformer import ModelConfig, Transformer
from rl import config as rl_config
from train import aot, objectives
from train.validate import validate
from tests.test_sharding import random_batch


def packed_rows(rng, batch, length, vocab=512):
  """Rows of 1-4 documents, a padded tail (segment 0, no loss) on every other row."""
  return random_batch(rng, batch, length, vocab, docs=4, padded=True)


def reference_attention(q, k, v, seg, branches):
  """float64 NumPy: softmax(q k^T / sqrt(hd)) v under model/attention.py's mask, query head
  kv * group + g reading kv head kv."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  t = q.shape[1]
  slots = np.arange(t)
  mask = ((seg[:, :, None] == seg[:, None, :]) & (slots[:, None] >= slots[None, :])
          & ((branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])))  # [b, t, s]
  scores = np.einsum("btkgh,bskh->bkgts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[:, None, None], scores, -np.inf)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bkgts,bskh->btkgh", w, v)


@pytest.mark.eight_devices
def test_ring_attention_equals_float64_attention():
  """Packed documents, padding, branches (a shared trunk, two branches that never see each other)
  and grouped queries (2 kv heads x 3 queries), rows split 4 ways (16 tokens per device), each
  device's queries in 4 blocks (one block: the model tests below)."""
  rng = np.random.default_rng(1)
  b, t, kv, g, hd = 2, 64, 2, 3, 8
  q = rng.standard_normal((b, t, kv, g, hd)).astype(np.float32)
  k, v = (rng.standard_normal((b, t, kv, hd)).astype(np.float32) for _ in range(2))
  seg = packed_rows(rng, b, t)["segment_ids"]
  branches = np.zeros((b, t), np.int32)
  branches[1, 20:40], branches[1, 40:] = 1, 2
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, sequence=4, tensor=1))
  with sharding.use_mesh(mesh):
    got = jax.jit(context_parallel.attention, static_argnums=5)(q, k, v, seg, branches, 4)
  np.testing.assert_allclose(np.asarray(got), reference_attention(q, k, v, seg, branches), rtol=1e-5, atol=1e-6)


@pytest.mark.eight_devices
def test_ring_attention_gradients_equal_one_device_attention():
  """d<out, cotangent>/d(q, k, v) of the ring (4 query blocks per hop) against model/attention.py's
  grouped_attention under attention_mask, on one device."""
  rng = np.random.default_rng(2)
  b, t, kv, g, hd = 2, 64, 2, 2, 8
  q = rng.standard_normal((b, t, kv, g, hd)).astype(np.float32)
  k, v = (rng.standard_normal((b, t, kv, hd)).astype(np.float32) for _ in range(2))
  cot = rng.standard_normal((b, t, kv, g, hd)).astype(np.float32)
  seg = packed_rows(rng, b, t)["segment_ids"]
  branches = np.zeros((b, t), np.int32)
  branches[0, 30:45], branches[0, 45:] = 1, 2
  slots = np.broadcast_to(np.arange(t), (b, t))
  mask = attention.attention_mask(seg, seg, slots, slots, branches)
  one = jax.grad(lambda q, k, v: jnp.sum(attention.grouped_attention(q, k, v, mask) * cot), (0, 1, 2))
  ring = jax.grad(lambda q, k, v: jnp.sum(context_parallel.attention(q, k, v, seg, branches, 4) * cot), (0, 1, 2))
  want = jax.jit(one)(q, k, v)
  with sharding.use_mesh(sharding.make_mesh(dict(data=2, fsdp=1, sequence=4, tensor=1))):
    got = jax.jit(ring)(q, k, v)
  for g_, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g_), np.asarray(w), rtol=1e-5, atol=1e-6)


def _collectives(hlo: str) -> list:
  """(op, dims) of every cross-device op of a compiled module."""
  ops = re.findall(r"= (.*?) (all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(", hlo)
  return [(op, tuple(int(d) for d in dims.split(",") if d))
          for shape, op in ops for dims in re.findall(r"\w+\[([\d,]*)\]", shape)]


@pytest.fixture(scope="module")
def unsharded():
  """The tiny model's layer (4 query heads on 2 kv heads), packed rows of 256 tokens, the
  pretraining loss with the LM head in chunks of 32 positions; its value and gradients on one
  device."""
  model = Transformer(ModelConfig.from_config(dict(models.tiny(), n_layers=1)))
  batch = packed_rows(np.random.default_rng(0), 4, 256)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch["inputs"][:1]))["params"]
  config = pretrain_tiny.get_config()
  config.logits_chunk = 32

  def loss(p, b):
    num, den, _ = objectives.get("pretrain").loss(p, b, model, objectives.Context(config))
    return num / den

  one = jax.devices()[0]
  ref = jax.jit(jax.value_and_grad(loss))(jax.device_put(params, one), jax.device_put(batch, one))
  return model, params, batch, loss, ref


@pytest.mark.eight_devices
@pytest.mark.parametrize("axes", [dict(data=1, fsdp=2, tensor=1, sequence=4), dict(sequence=8)])
def test_context_parallel_loss_and_gradients_equal_one_device(axes, unsharded):
  """The loss and every gradient, fp32: within 1e-5 of the largest entry of each, as on any other
  mesh. The step moves [rows, t / n] key and value blocks around the ring and gathers weights
  (fsdp); no activation of a whole row."""
  model, params, batch, loss, (ref_loss, ref_grads) = unsharded
  cfg = model.cfg
  b, t = batch["inputs"].shape
  mesh = sharding.make_mesh(axes)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, t), jnp.int32))["params"]
  p = jax.device_put(params, sharding.tree_shardings(boxed, mesh))
  sharded = sharding.put_batch(batch, mesh)
  n = mesh.shape["sequence"]
  assert sharded["inputs"].addressable_shards[0].data.shape == (b // mesh.shape["fsdp"], t // n)
  with sharding.use_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss)).lower(p, sharded).compile()
  got_loss, got_grads = step(p, sharded)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  refs = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
    g, r = np.asarray(g), np.asarray(refs[path])
    assert np.max(np.abs(g - r)) <= 1e-5 * np.max(np.abs(r)), jax.tree_util.keystr(path)
  ops = _collectives(step.as_text())
  rows = b // mesh.shape["fsdp"]
  assert ("collective-permute", (rows, t // n, cfg.n_kv_heads, cfg.head_dim)) in ops   # k, v blocks
  moved = [(op, d) for op, d in ops if op in ("all-gather", "all-to-all") and t in d]
  assert not moved, f"whole rows moved: {moved}"


def test_seq_len_must_split_over_the_sequence_axis():
  c = pretrain_tiny.get_config()
  c.mesh.data, c.mesh.sequence, c.seq_len = 1, 8, 100
  with pytest.raises(UserError, match=r"config.seq_len=100 .* config.mesh.sequence=8"):
    validate(c, 8)


def test_a_sequence_split_config_compiles_for_a_v5p_slice():
  """train.aot takes mesh.sequence: the tiny step for 4 v5p chips, rows split 2 ways."""
  c = pretrain_tiny.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence = 1, 2, 2
  c.model.dtype, c.batch_size, c.seq_len = "bfloat16", 4, 64
  out = aot.report(c, "v5p-8")
  assert out["fits"] and out["collectives"]["collective-permute"]["count"] > 0  # the ring


def test_rl_stages_keep_rows_whole():
  c = grpo_arith.get_config()
  c.mesh.sequence = 2
  with pytest.raises(UserError, match="config.mesh.sequence=2"):
    rl_config.check(c)
