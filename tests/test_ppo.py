"""rl/ppo.py against float64 NumPy references (docs/algorithms.md, "PPO")."""
import jax.numpy as jnp
import numpy as np
import pytest

from rl import ppo

RTOL, ATOL = 1e-5, 1e-6


def _batch(seed=0, b=5, t=11, holes=False):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, t + 1, b)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)  # right-padded
  if holes:
    mask[:, 1] = 0  # e.g. a masked tool-output token inside the completion
  f = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return mask, f(b, t), f(b, t), rng


def _np_gae(r, v, mask, gamma, lam):
  """Backward python loop; masked tokens are skipped (V and A of the next valid token)."""
  r, v = np.asarray(r, np.float64), np.asarray(v, np.float64)
  adv = np.zeros_like(r)
  for i in range(r.shape[0]):
    next_v, next_a = 0.0, 0.0
    for t in reversed(range(r.shape[1])):
      if not mask[i, t]:
        continue
      delta = r[i, t] + gamma * next_v - v[i, t]
      adv[i, t] = delta + gamma * lam * next_a
      next_v, next_a = v[i, t], adv[i, t]
  return adv, (adv + v) * mask


@pytest.mark.parametrize("gamma,lam,holes", [(1.0, 0.95, False), (0.9, 0.8, True)])
def test_gae_matches_backward_loop(gamma, lam, holes):
  mask, r, v, _ = _batch(0, holes=holes)
  adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam)
  want_adv, want_ret = _np_gae(r, v, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ret, want_ret, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(adv)[mask == 0] == 0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
  mask, x, _, _ = _batch(1)
  x = x * 3 + 2
  valid = x[mask > 0].astype(np.float64)
  mean, var = valid.mean(), valid.var()
  want = (x - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  got = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean))
  np.testing.assert_allclose(got, want * mask, rtol=RTOL, atol=ATOL)
  if shift_mean:
    np.testing.assert_allclose(got[mask > 0].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(got[mask > 0].std(), 1.0, rtol=1e-4)


def test_policy_loss_matches_numpy():
  mask, adv, _, rng = _batch(2)
  logp = rng.normal(-1.5, 0.5, mask.shape).astype(np.float32)
  old = (logp + rng.normal(0, 0.3, mask.shape)).astype(np.float32)
  loss, m = ppo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                            jnp.asarray(mask), clip_eps=0.2)
  lr = logp.astype(np.float64) - old
  rho, a, sel = np.exp(lr), adv.astype(np.float64), mask > 0
  l1, l2 = -a * rho, -a * np.clip(rho, 0.8, 1.2)
  np.testing.assert_allclose(loss, np.maximum(l1, l2)[sel].mean(), rtol=RTOL)
  assert 0 < float(m["clip_fraction"]) < 1
  np.testing.assert_allclose(m["clip_fraction"], (l2 > l1)[sel].mean(), rtol=RTOL)
  np.testing.assert_allclose(m["approx_kl"], (np.exp(lr) - 1 - lr)[sel].mean(), rtol=RTOL)


def test_value_loss_matches_numpy():
  mask, values, returns, rng = _batch(3)
  old = (values + rng.normal(0, 0.3, mask.shape)).astype(np.float32)
  loss, m = ppo.value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns),
                           jnp.asarray(mask), clip=0.2)
  v, vo, ret, sel = values.astype(np.float64), old.astype(np.float64), returns, mask > 0
  v_clip = vo + np.clip(v - vo, -0.2, 0.2)
  e1, e2 = (v - ret) ** 2, (v_clip - ret) ** 2
  np.testing.assert_allclose(loss, 0.5 * np.maximum(e1, e2)[sel].mean(), rtol=RTOL)
  assert 0 < float(m["value_clip_fraction"]) < 1
  np.testing.assert_allclose(m["value_clip_fraction"], (e2 > e1)[sel].mean(), rtol=RTOL)


def test_per_token_rewards_matches_loop():
  mask, kl, _, rng = _batch(4, holes=True)
  scores = rng.normal(size=mask.shape[0]).astype(np.float32)
  got = ppo.per_token_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), 0.05)
  want = np.zeros(mask.shape)
  for i in range(mask.shape[0]):
    valid = [t for t in range(mask.shape[1]) if mask[i, t]]
    for t in valid:
      want[i, t] = -0.05 * kl[i, t]
    want[i, valid[-1]] += scores[i]
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_entropy_and_explained_variance_match_numpy():
  mask, values, returns, rng = _batch(5)
  logits = rng.normal(0, 2, mask.shape + (7,)).astype(np.float32)
  x = logits.astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ent = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(ppo.entropy_from_logits(jnp.asarray(logits), jnp.asarray(mask)),
                             ent[mask > 0].mean(), rtol=RTOL)
  v, ret = values[mask > 0].astype(np.float64), returns[mask > 0].astype(np.float64)
  ev = 1 - np.var(ret - v) / (np.var(ret) + 1e-8)
  np.testing.assert_allclose(ppo.explained_variance(values, returns, mask), ev, rtol=RTOL)
  np.testing.assert_allclose(ppo.explained_variance(returns, returns, mask), 1.0, rtol=RTOL)


def test_ppo_loss_combines_terms():
  mask, adv, values, rng = _batch(6)
  logp = rng.normal(-1, 0.5, mask.shape).astype(np.float32)
  old = (logp + rng.normal(0, 0.2, mask.shape)).astype(np.float32)
  old_v = (values + rng.normal(0, 0.3, mask.shape)).astype(np.float32)
  ret = rng.normal(size=mask.shape).astype(np.float32)
  ent = jnp.float32(1.7)
  loss, m = ppo.ppo_loss(logp, old, adv, values, old_v, ret, mask, vf_coef=0.5,
                         ent_coef=0.01, entropy=ent)
  pl, _ = ppo.policy_loss(logp, old, adv, mask)
  vl, _ = ppo.value_loss(values, old_v, ret, mask)
  np.testing.assert_allclose(loss, float(pl) + 0.5 * float(vl) - 0.01 * 1.7, rtol=RTOL)
  for key in ("approx_kl", "clip_fraction", "value_clip_fraction", "explained_variance"):
    assert key in m
