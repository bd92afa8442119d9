"""rl/kl.py against float64 NumPy references (docs/algorithms.md, "KL")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import kl

RTOL, ATOL = 1e-5, 1e-6


def _inputs(seed=0, b=4, t=9):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-2.0, 1.0, (b, t)).astype(np.float32)
  ref = (logp + rng.normal(0.0, 0.5, (b, t))).astype(np.float32)
  lengths = rng.integers(1, t + 1, b)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  return logp, ref, mask


def test_estimators_match_numpy():
  logp, ref, _ = _inputs()
  l = logp.astype(np.float64) - ref.astype(np.float64)
  want = {"k1": l, "k2": l**2 / 2, "k3": np.exp(-l) - 1 + l}
  for kind, ref_val in want.items():
    got = kl.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), kind)
    np.testing.assert_allclose(got, ref_val, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(kl.k3(logp, ref)) >= 0)
  with pytest.raises(ValueError):
    kl.kl_penalty(logp, ref, "k4")


def test_masked_means_match_numpy():
  logp, ref, mask = _inputs(1)
  x = logp.astype(np.float64)
  np.testing.assert_allclose(kl.masked_mean(logp, mask), (x * mask).sum() / mask.sum(), rtol=RTOL)
  rows = [(x[i] * mask[i]).sum() / mask[i].sum() for i in range(len(x))]
  np.testing.assert_allclose(kl.masked_mean(logp, mask, axis=-1), rows, rtol=RTOL)
  np.testing.assert_allclose(kl.masked_sum(logp, mask), (x * mask).sum(), rtol=RTOL)
  empty = np.zeros_like(mask)
  assert float(kl.masked_mean(logp, empty)) == 0.0  # no nan on an empty mask


def test_adaptive_controller_matches_numpy_loop():
  init_beta, target, horizon, n = 0.05, 6.0, 10000, 256
  observed = [3.0, 6.5, 12.0, 5.9, 0.4, 7.1]  # includes both clip limits
  state = kl.init_kl_controller(init_beta, target, horizon)
  step = jax.jit(kl.update_kl_controller)
  beta = init_beta
  for obs in observed:
    e = np.clip(obs / target - 1.0, -0.2, 0.2)
    beta = beta * (1 + e * n / horizon)
    state = step(state, jnp.float32(obs), n)
    np.testing.assert_allclose(state["beta"], beta, rtol=RTOL)
  assert beta != init_beta


def test_fixed_controller_keeps_beta():
  state = kl.init_kl_controller(0.04)
  for obs in (0.1, 50.0):
    state = kl.update_kl_controller(state, obs, 64)
  assert float(state["beta"]) == float(np.float32(0.04))
