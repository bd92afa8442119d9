"""On 8 fake CPU devices, every mesh gives the loss and gradients of one device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, models
from model import sharding
from model.transformer import ModelConfig, Transformer
from train import loop, objectives, optim


def random_batch(rng, batch=16, length=32, vocab=512):
  """Packed rows with 1-3 documents each, random tokens and loss masks."""
  seg = np.sort(rng.integers(1, 4, (batch, length)), axis=1).astype(np.int32)
  pos = np.zeros_like(seg)
  for b in range(batch):
    for t in range(1, length):
      pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
  return dict(inputs=rng.integers(0, vocab, (batch, length)).astype(np.int32),
              targets=rng.integers(0, vocab, (batch, length)).astype(np.int32),
              segment_ids=seg, positions=pos,
              loss_mask=(rng.random((batch, length)) < 0.8).astype(np.float32))


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
