"""Log-probs (and entropy) of given tokens in sequence chunks (config.logits_chunk): the LM head
function, DPO's completion log-probs and the RL update step give the same values and gradients
chunked as in one piece, and match a float64 NumPy reference of the log-prob."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import grpo_arith, models
from model import lm_head, sharding
from model.transformer import ModelConfig, Transformer
from rl import algorithms, steps
from train import objectives


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("tied", [False, True])
def test_token_logps_and_entropy_in_chunks_equal_one_piece_and_float64(tied):
  rng = np.random.default_rng(0)
  b, t, d, v, temp = 3, 37, 16, 300, 0.7  # 37 positions: chunks of 8 leave a padded last chunk
  h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(v, d) if tied else (d, v)), jnp.float32)
  y = jnp.asarray(rng.integers(0, v, (b, t)))
  w = jnp.asarray(rng.normal(size=(2, b, t)), jnp.float32)

  def f(h, kernel, chunk):
    logp, ent = lm_head.token_logps(h, kernel, tied, y, chunk, temp, entropy=True)
    return jnp.sum(w[0] * logp + w[1] * ent), (logp, ent)

  grad = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True), static_argnums=2)
  (_, (lp0, e0)), g0 = grad(h, kernel, 0)
  (_, (lp8, e8)), g8 = grad(h, kernel, 8)
  w64 = np.asarray(kernel, np.float64)
  z = np.asarray(h, np.float64) @ (w64.T if tied else w64) / temp  # [b, t, v]
  ls = _log_softmax64(z)
  ref_lp = np.take_along_axis(ls, np.asarray(y)[..., None], -1)[..., 0]
  ref_ent = -(np.exp(ls) * ls).sum(-1)
  for lp, ent in ((lp0, e0), (lp8, e8)):
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-4)  # lse - E[z]: fp32 cancellation
  assert _max_diff(g0, g8) < 1e-4 and max(float(jnp.abs(g).max()) for g in g8) > 0.1
  assert lm_head.token_logps(h, kernel, tied, y, 8)[1] is None


def _tiny(tie=False):
  mc = models.tiny()
  mc.tie_embeddings = tie
  return Transformer(ModelConfig.from_config(mc))


def test_dpo_pair_logps_in_chunks_equal_one_piece_and_float64():
  model = _tiny()
  rng = np.random.default_rng(1)
  b, length, k = 2, 48, 20
  branch = np.zeros((b, length), np.int32)
  branch[:, 16:32], branch[:, 32:] = 1, 2
  batch = {"tokens": rng.integers(0, 512, (b, length)), "positions": np.broadcast_to(np.arange(length), (b, length)),
           "segment_ids": np.ones((b, length), np.int32), "branch_ids": branch,
           "logit_slots": np.sort(rng.integers(15, length, (b, k)), -1), "targets": rng.integers(0, 512, (b, k)),
           "target_branch": rng.integers(0, 3, (b, k)), "target_pair": np.zeros((b, k)), "weight": np.ones(b)}
  batch = {key: jnp.asarray(x, jnp.int32) for key, x in batch.items()}
  params = sharding.unbox(model.init(jax.random.key(0), batch["tokens"])["params"])
  def f(p, chunk):
    logps, n = objectives.pair_logps(p, batch, model, chunk)  # [b, 2] each
    return jnp.sum(logps * jnp.array([1.0, -0.5])), (logps, n)
  grad = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)
  (_, (whole, _)), g0 = grad(params, 0)
  (_, (chunked, n6)), g6 = grad(params, 6)
  # float64 reference from the model's own logits at the slots [b, k, V]
  z = jax.jit(lambda p, bt: model.apply({"params": p}, bt["tokens"], bt["positions"], bt["segment_ids"],
                                        branch_ids=bt["branch_ids"], logit_slots=bt["logit_slots"]))(params, batch)
  tok = np.take_along_axis(_log_softmax64(z), np.asarray(batch["targets"])[..., None], -1)[..., 0]
  tb = np.asarray(batch["target_branch"])
  ref = np.stack([(tok * (tb == 1)).sum(-1), (tok * (tb == 2)).sum(-1)], -1)
  np.testing.assert_allclose(whole, ref, rtol=1e-5)
  np.testing.assert_allclose(chunked, ref, rtol=1e-5)
  np.testing.assert_array_equal(n6, np.stack([(tb == 1).sum(-1), (tb == 2).sum(-1)], -1))
  assert _max_diff(g0, g6) < 1e-4


@pytest.mark.parametrize("objective", [pytest.param("grpo", marks=pytest.mark.slow), "ppo"])
def test_rl_update_in_chunks_equals_one_piece_and_float64(objective):
  """One SGD step of lr 1 (params move by minus the gradient) of the real update step."""
  c = grpo_arith.get_config()
  c.objective = objective
  c.rl.temperature, c.rl.ent_coef, c.rl.num_generations = 0.8, 0.01, 2
  if objective == "ppo":
    c.rl.value_model = "policy"
  cfg = ModelConfig.from_config(c.model)
  model = Transformer(cfg)
  rng = np.random.default_rng(2)
  n, g, p, t = 2, 2, 6, 21
  params = sharding.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
  if objective == "ppo":
    params = {**params, "value_head": {"kernel": jnp.full((cfg.d_model,), 0.1), "bias": jnp.zeros(())}}
  mask = (np.arange(t) < rng.integers(5, t + 1, (n * g, 1))).astype(np.int32)
  batch = {"prompt": rng.integers(6, 500, (n, p)), "prompt_mask": np.ones((n, p), np.int32),
           "tokens": rng.integers(6, 500, (n * g, t)) * mask, "mask": mask,
           "ref_logp": rng.normal(-3, 0.5, (n * g, t)) * mask, "old_logp": rng.normal(-3, 0.5, (n * g, t)) * mask}
  batch = {k: jnp.asarray(x, jnp.float32 if "logp" in k else jnp.int32) for k, x in batch.items()}
  if objective == "ppo":
    batch["old_values"] = jnp.asarray(rng.normal(size=(n * g, t)) * mask, jnp.float32)
  batch.update(algorithms.get(objective).advantages(c, jnp.arange(n * g, dtype=jnp.float32), batch, 0.1))
  tx = optax.sgd(1.0)
  out = {}
  for chunk in (0, 8):
    c.logits_chunk = chunk
    step = jax.jit(steps.make_update_step(cfg, c, tx, lambda _: 1.0, None))
    out[chunk] = step(params, tx.init(params), None, None, None, batch, jnp.float32(0.1), jnp.int32(0))
  (p0, _, _, _, lp0, m0), (p8, _, _, _, lp8, m8) = out[0], out[8]
  full = np.concatenate([np.repeat(np.asarray(batch["prompt"]), g, 0), np.asarray(batch["tokens"])], 1)
  z = jax.jit(model.apply)({"params": params}, jnp.asarray(full[:, :-1]))[:, p - 1:] / 0.8  # [r, t, V]
  ref = np.take_along_axis(_log_softmax64(z), full[:, p:, None], -1)[..., 0] * mask
  np.testing.assert_allclose(lp0, ref, atol=2e-5)
  np.testing.assert_allclose(lp8, ref, atol=2e-5)
  for k in m0:
    np.testing.assert_allclose(m0[k], m8[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(m0["entropy"]) > 1.0 and float(m0["skipped"]) == 0
  assert _max_diff(p0, p8) < 1e-5 and _max_diff(p0, params) > 1e-4


@pytest.mark.slow
def test_the_chunked_rl_update_keeps_the_full_logits_out_of_memory():
  """The compiled update step with an 8k vocabulary: chunked, its temporaries shrink by more than
  the [r, T, vocab] fp32 logits."""
  c = grpo_arith.get_config()
  c.model.vocab_size, c.rl.num_generations = 8192, 2
  cfg = ModelConfig.from_config(c.model)
  init = lambda: sharding.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.eval_shape(init)
  r, t, p = 4, 128, 8
  s = jax.ShapeDtypeStruct
  batch = {"prompt": s((2, p), jnp.int32), "prompt_mask": s((2, p), jnp.int32), "tokens": s((r, t), jnp.int32),
           "mask": s((r, t), jnp.int32), "ref_logp": s((r, t), jnp.float32), "old_logp": s((r, t), jnp.float32),
           "advantages": s((r,), jnp.float32)}
  tx = optax.sgd(1.0)
  temp = {}
  for chunk in (0, 32):
    c.logits_chunk = chunk
    step = jax.jit(steps.make_update_step(cfg, c, tx, lambda _: 1.0, None))
    lowered = step.lower(params, jax.eval_shape(tx.init, params), None, None, None, batch, s((), jnp.float32),
                         s((), jnp.int32))
    temp[chunk] = lowered.compile().memory_analysis().temp_size_in_bytes
  assert temp[0] - temp[32] > r * t * 8192 * 4, temp
