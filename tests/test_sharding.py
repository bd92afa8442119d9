"""On 8 fake CPU devices, every mesh gives the loss and gradients of one device."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, models
from model import sharding
from model.transformer import ModelConfig, Transformer
from train import loop, objectives, optim


def random_batch(rng, batch=16, length=32, vocab=512, docs=3, padded=False):
  """Packed rows with 1-`docs` documents each, random tokens and loss masks; `padded`: a padded tail
  (segment 0, no loss) on every other row."""
  seg = np.sort(rng.integers(1, docs + 1, (batch, length)), axis=1).astype(np.int32)
  if padded:
    seg[::2, -length // 5:] = 0
  pos = np.zeros_like(seg)
  for b in range(batch):
    for t in range(1, length):
      pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
  return dict(inputs=rng.integers(0, vocab, (batch, length)).astype(np.int32),
              targets=rng.integers(0, vocab, (batch, length)).astype(np.int32),
              segment_ids=seg, positions=pos,
              loss_mask=((rng.random((batch, length)) < 0.8) & (seg > 0)).astype(np.float32))


def setup():
  cfg = ModelConfig.from_config(models.tiny())
  model = Transformer(cfg)
  batch = random_batch(np.random.default_rng(0))
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(batch["inputs"][:1])))["params"]
  def loss(p, b):
    num, den, _ = objectives.next_token_loss(p, b, model)
    return num / den
  return model, params, batch, loss


@pytest.mark.eight_devices
@pytest.mark.parametrize("axes", [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
                                  dict(data=2, fsdp=2, tensor=2)])
def test_mesh_gives_single_device_loss_and_grads(axes):
  model, params, batch, loss = setup()
  one = jax.devices()[0]
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(jax.device_put(params, one),
                                                          jax.device_put(batch, one))
  mesh = sharding.make_mesh(axes)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
  shardings = sharding.tree_shardings(boxed, mesh)
  p = jax.device_put(params, shardings)
  b = sharding.put_batch(batch, mesh)
  with sharding.use_mesh(mesh):
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(p, b)
  if axes["fsdp"] == 8:  # weights really are split: each device holds 1/8 of the qkv kernel
    qkv = p["layer_0"]["attn"]["qkv"]
    assert qkv.addressable_shards[0].data.shape[0] == qkv.shape[0] // 8
  if axes["tensor"] == 2:
    mlp = p["layer_0"]["mlp"]["down"]
    assert mlp.addressable_shards[0].data.shape[0] == mlp.shape[0] // 2
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_is_exact():
  model, params, batch, _ = setup()
  c = base.base_config()
  tx, lr = optim.make_optimizer(c.optim, 10)
  results = []
  for accum in (1, 4):
    step = jax.jit(loop.make_train_step(model, objectives.get("pretrain"), tx, lr, accum))
    p, _, m = step(params, tx.init(params), jax.tree.map(jnp.asarray, batch), jnp.int32(3))
    results.append((p, m))
  (p1, m1), (p4, m4) = results
  np.testing.assert_allclose(m4["train/loss"], m1["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["train/grad_norm"], m1["train/grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _collectives(compiled_text: str) -> list[tuple[tuple, str]]:
  """(dims, op) of every array a cross-device op of an optimized HLO module produces; combined
  (tuple-shaped) and async ops give one entry per array."""
  ops = re.findall(r"= (.*?) (all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(", compiled_text)
  return [(tuple(int(d) for d in dims.split(",") if d), op)
          for shape, op in ops for dims in re.findall(r"\w+\[([\d,]*)\]", shape)]


@pytest.mark.eight_devices
def test_tensor_parallel_weights_are_never_gathered():
  """On a (data 4, tensor 2) mesh the train step multiplies every weight shard by shard: apart from
  all-reduces (of row-parallel outputs, input gradients and the data-parallel gradients) it moves
  at most one number per token and shard (partial results of a reduction over the split
  vocabulary), never a weight or an activation. The MLP's [embed, 2, mlp] kernel used to be
  all-gathered whole in the forward pass and its activation gradient in the backward
  (model/dense.py `matmul`)."""
  model, params, batch, _ = setup()
  c = base.base_config()
  tx, lr = optim.make_optimizer(c.optim, 10)
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=2))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
  p = jax.device_put(params, sharding.tree_shardings(boxed, mesh))
  assert p["layer_0"]["mlp"]["gate_up"].addressable_shards[0].data.shape[-1] == models.tiny().mlp_dim // 2
  b = sharding.put_batch(batch, mesh)
  step = jax.jit(loop.make_train_step(model, objectives.get("pretrain"), tx, lr, 1))
  with sharding.use_mesh(mesh):
    text = step.lower(p, tx.init(p), b, jnp.int32(0)).compile().as_text()
  ops = _collectives(text)
  assert any(op == "all-reduce" for _, op in ops), "expected the tensor-parallel all-reduces"
  per_token = (len(batch["inputs"]) // 4) * batch["inputs"].shape[1] * 2  # rows per data shard x length x tensor
  moved = [(d, op) for d, op in ops if op != "all-reduce" and math.prod(d) > per_token]
  assert not moved, f"train step moves arrays between devices: {moved}"


@pytest.mark.eight_devices
def test_tensor_parallel_decoding_never_gathers_a_weight():
  """Decoding on a tensor-parallel mesh keeps every weight split: no all-gather or permute in the
  compiled generate has a parameter's full shape (the sampler gathers a few [batch, k] numbers
  of the vocabulary-split logits)."""
  from model import decode
  from model.sampling import Sampling
  model, params, _, _ = setup()
  cfg = model.cfg
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=2), jax.devices()[:2])
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
  p = jax.device_put(params, sharding.tree_shardings(boxed, mesh))
  tokens = jnp.ones((2, 8), jnp.int32)
  with sharding.use_mesh(mesh):
    t = jax.device_put(tokens, sharding.batch_sharding(mesh))
    text = decode._generate.lower(p, t, jnp.ones_like(t), jax.random.key(0), decode._stop_array(()),
                                  cfg=cfg, apply_fn=decode.transformer_apply, max_new_tokens=16,
                                  sampling=Sampling(1.0, 0, 0.9), pad_id=0, phases=1).compile().as_text()
  weight_shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
  moved = [(d, op) for d, op in _collectives(text) if op != "all-reduce" and d in weight_shapes]
  assert not moved, f"decoding gathers whole weights: {moved}"


@pytest.mark.eight_devices
def test_lm_head_on_a_split_vocabulary_moves_no_activation():
  """The CPU-blocked LM head (1024-wide vocabulary blocks) would cut across the shards of a
  vocabulary split over `tensor`; under such a mesh it is one dot, and its gradient needs only
  the all-reduce of the input gradient."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from model import lm_head
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=2), jax.devices()[:2])
  rng = np.random.default_rng(0)
  h = jax.device_put(rng.standard_normal((4, 128, 32)).astype(np.float32), NamedSharding(mesh, P()))
  w = jax.device_put(rng.standard_normal((32, 4 * lm_head.VOCAB_BLOCK)).astype(np.float32),
                     NamedSharding(mesh, P(None, "tensor")))
  loss = lambda h, w: jnp.sum(jnp.sin(lm_head.logits(h, w, tied=False)))
  with sharding.use_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w).compile().as_text()
  moved = [(d, op) for d, op in _collectives(text) if op != "all-reduce"]
  assert not moved, f"the LM head moves arrays between devices: {moved}"
