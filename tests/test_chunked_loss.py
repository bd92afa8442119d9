"""The LM head and cross-entropy in sequence chunks (config.logits_chunk): the same loss and
gradients as in one piece, against a float64 NumPy reference, without the [b, t, vocab] array."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import models
from model import sharding
from model.transformer import ModelConfig, Transformer
from train import objectives


def _setup(vocab=512, t=64, b=2, tie=False, seed=0):
  mc = models.tiny()
  mc.vocab_size, mc.tie_embeddings = vocab, tie
  model = Transformer(ModelConfig.from_config(mc))
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t + 1))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t), (b, t)),
           "loss_mask": (rng.random((b, t)) < 0.7).astype(np.float32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = sharding.unbox(model.init(jax.random.key(seed), batch["inputs"])["params"])
  return model, params, batch


def _loss(chunk):
  ctx = objectives.Context(ConfigDict({"logits_chunk": chunk}))
  def f(params, batch, model):
    num, den, sums = objectives.next_token_loss(params, batch, model, ctx)
    return num / den, sums["accuracy"]
  return f


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_and_grads_equal_one_piece_and_the_reference(tie):
  model, params, batch = _setup(tie=tie)
  (whole, acc), g_whole = jax.value_and_grad(_loss(0), has_aux=True)(params, batch, model)
  (chunked, acc_c), g_chunked = jax.value_and_grad(_loss(16), has_aux=True)(params, batch, model)
  # float64 reference from the model's own logits
  logits = np.asarray(model.apply({"params": params}, batch["inputs"], batch["positions"]), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = lse - np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["loss_mask"], np.float64)
  ref = (nll * mask).sum() / mask.sum()
  ref_acc = ((logits.argmax(-1) == np.asarray(batch["targets"])) * mask).sum()
  np.testing.assert_allclose([float(whole), float(chunked)], [ref, ref], rtol=1e-5)
  assert float(acc) == float(acc_c) == ref_acc
  for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_chunked)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_chunked)) > 0


def test_chunks_keep_the_full_logits_out_of_memory():
  """A train-step gradient with an 8k vocabulary: chunked, the compiled step's temporaries shrink
  by most of the [b, t, vocab] fp32 logits and their gradient."""
  b, t, vocab = 2, 128, 8192
  model, params, batch = _setup(vocab=vocab, t=t, b=b)
  temp = {}
  for chunk in (0, 32):
    grad = jax.jit(jax.grad(lambda p, bt, c=chunk: _loss(c)(p, bt, model)[0]))
    temp[chunk] = grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = b * t * vocab * 4
  assert temp[0] - temp[32] > logits_bytes, temp


def test_a_chunk_that_does_not_divide_the_sequence_pads_its_last_piece():
  model, params, batch = _setup(t=64)
  np.testing.assert_allclose(_loss(24)(params, batch, model)[0], _loss(0)(params, batch, model)[0], rtol=1e-6)
