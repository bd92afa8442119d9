"""rl/grpo.py against float64 NumPy references (docs/algorithms.md, "GRPO family")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import grpo

RTOL, ATOL = 1e-5, 1e-6


def _np_advantages(r, g, scale, estimator):
  r = np.asarray(r, np.float64)
  out = np.zeros_like(r)
  batch_std = np.std(r, ddof=1)
  for p in range(len(r) // g):
    grp = r[p * g:(p + 1) * g]
    for i in range(g):
      if estimator == "grpo":
        a = grp[i] - grp.mean()
      else:
        a = grp[i] - (grp.sum() - grp[i]) / (g - 1)
      if scale == "group":
        a /= np.std(grp, ddof=1) + 1e-4
      elif scale == "batch":
        a /= batch_std + 1e-4
      out[p * g + i] = a
  return out


@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("grpo", "batch"),
                                             ("grpo", "none"), ("rloo", "none"), ("rloo", "group")])
def test_group_advantages_match_numpy(estimator, scale):
  g = 4
  r = np.random.default_rng(0).normal(0.5, 1.0, 3 * g).astype(np.float32)
  got = grpo.group_advantages(jnp.asarray(r), g, scale=scale, estimator=estimator)
  np.testing.assert_allclose(got, _np_advantages(r, g, scale, estimator), rtol=RTOL, atol=ATOL)


def test_default_scale_per_estimator():
  r = np.random.default_rng(1).normal(size=8).astype(np.float32)
  np.testing.assert_allclose(grpo.group_advantages(r, 4), _np_advantages(r, 4, "group", "grpo"),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grpo.group_advantages(r, 4, estimator="rloo"),
                             _np_advantages(r, 4, "none", "rloo"), rtol=RTOL, atol=ATOL)


def test_equal_reward_groups_get_zero_advantage():
  r = np.array([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 1.0, 0.7, 0.7, 0.7, 0.7], np.float32)
  for estimator in ("grpo", "rloo"):
    for scale in ("group", "batch", "none"):
      a = np.asarray(grpo.group_advantages(r, 4, scale=scale, estimator=estimator))
      assert np.all(a[:4] == 0) and np.all(a[8:] == 0) and np.any(a[4:8] != 0)
  np.testing.assert_allclose(grpo.zero_spread_fraction(r, 4), 2 / 3, rtol=RTOL)


def _np_token_loss(logp, old, ref, adv, mask, el, eh, beta, level):
  logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
  n, t = logp.shape
  out = np.zeros((n, t))
  for i in range(n):
    seq_lr = sum((logp[i, j] - old[i, j]) for j in range(t) if mask[i, j]) / mask[i].sum()
    for j in range(t):
      lr = seq_lr if level == "sequence" else logp[i, j] - old[i, j]
      rho = np.exp(lr)
      surr = min(rho * adv[i], np.clip(rho, 1 - el, 1 + eh) * adv[i])
      l_ref = logp[i, j] - ref[i, j]
      out[i, j] = -surr + beta * (np.exp(-l_ref) - 1 + l_ref)
  return out


def _np_aggregate(loss, mask, mode, max_len):
  loss = np.asarray(loss, np.float64)
  n, t = loss.shape
  if mode == "grpo":
    return np.mean([(loss[i] * mask[i]).sum() / mask[i].sum() for i in range(n)])
  if mode == "token_mean":
    return (loss * mask).sum() / mask.sum()
  return (loss * mask).sum() / (n * (max_len or t))


def _rollout(seed=0, n=6, t=12):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-1.5, 0.7, (n, t)).astype(np.float32)
  old = (logp + rng.normal(0, 0.4, (n, t))).astype(np.float32)  # ratios beyond the clip range
  ref = (logp + rng.normal(0, 0.4, (n, t))).astype(np.float32)
  adv = rng.normal(0, 1, n).astype(np.float32)
  lengths = rng.integers(2, t + 1, n)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  mask[0, 0] = 0  # a prompt-side hole too
  return logp, old, ref, adv, mask


@pytest.mark.parametrize("level,eh,beta", [("token", None, 0.0), ("token", 0.28, 0.04),
                                           ("sequence", 0.28, 0.1)])
def test_token_loss_matches_numpy(level, eh, beta):
  logp, old, ref, adv, mask = _rollout(1)
  got, m = grpo.grpo_token_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=eh,
                                beta=beta, ratio_level=level)
  want = _np_token_loss(logp, old, ref, adv, mask, 0.2, eh or 0.2, beta, level)
  np.testing.assert_allclose(got * mask, want * mask, rtol=RTOL, atol=ATOL)
  if level == "token":
    rho = np.exp(logp.astype(np.float64) - old)
    low = (rho < 0.8) & (adv[:, None] < 0)
    high = (rho > 1 + (eh or 0.2)) & (adv[:, None] > 0)
    assert low[mask > 0].any() and high[mask > 0].any()
    np.testing.assert_allclose(m["clip_fraction/low"], low[mask > 0].mean(), rtol=RTOL)
    np.testing.assert_allclose(m["clip_fraction/high"], high[mask > 0].mean(), rtol=RTOL)
    np.testing.assert_allclose(m["ratio_mean"], rho[mask > 0].mean(), rtol=RTOL)
  l_ref = logp.astype(np.float64) - ref
  np.testing.assert_allclose(m["kl"], (np.exp(-l_ref) - 1 + l_ref)[mask > 0].mean(), rtol=RTOL)


@pytest.mark.parametrize("mode,max_len", [("grpo", None), ("token_mean", None),
                                          ("dr_grpo", None), ("dr_grpo", 20)])
def test_aggregate_matches_numpy(mode, max_len):
  logp, old, ref, adv, mask = _rollout(2)
  per_tok = np.random.default_rng(3).normal(size=logp.shape).astype(np.float32)
  got = grpo.aggregate(jnp.asarray(per_tok), jnp.asarray(mask), mode, max_len)
  np.testing.assert_allclose(got, _np_aggregate(per_tok, mask, mode, max_len), rtol=RTOL)
  loss, _ = grpo.grpo_loss(logp, old, ref, adv, mask, beta=0.05, loss_agg=mode,
                           max_completion_length=max_len)
  want = _np_aggregate(_np_token_loss(logp, old, ref, adv, mask, 0.2, 0.2, 0.05, "token"),
                       mask, mode, max_len)
  np.testing.assert_allclose(loss, want, rtol=RTOL)


def test_length_bias_grpo_vs_dr_grpo():
  t = 100
  mask = np.zeros((2, t), np.float32)
  mask[0, :10], mask[1, :100] = 1, 1  # the same advantage over 10 vs 100 tokens
  adv = jnp.asarray([1.0, 1.0])
  logp = jnp.asarray(np.random.default_rng(4).normal(-1, 0.3, (2, t)), jnp.float32)
  weights = {}
  for mode in ("grpo", "dr_grpo", "token_mean"):
    f = lambda lp: grpo.grpo_loss(lp, None, None, adv, jnp.asarray(mask), loss_agg=mode)[0]
    g = np.asarray(jax.jit(jax.grad(f))(logp))
    assert np.all(g[mask == 0] == 0)
    weights[mode] = (g[0, 0], g[1, 0])
  short, long = weights["grpo"]
  np.testing.assert_allclose([short, long], [-1 / (2 * 10), -1 / (2 * 100)], rtol=RTOL)
  np.testing.assert_allclose(*weights["dr_grpo"], rtol=RTOL)
  np.testing.assert_allclose(weights["dr_grpo"][0], -1 / (2 * t), rtol=RTOL)
  np.testing.assert_allclose(*weights["token_mean"], rtol=RTOL)


def test_single_update_loss_zero_but_gradient_not():
  logp, _, _, _, mask = _rollout(5, n=8)
  rewards = np.random.default_rng(6).normal(size=8).astype(np.float32)
  adv = grpo.group_advantages(rewards, 4)  # sums to ~0 within each group
  f = lambda lp: grpo.grpo_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask)[0]
  loss, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(logp))
  assert abs(float(loss)) < 1e-5
  want = -np.asarray(adv, np.float64)[:, None] * mask / (len(mask) * mask.sum(-1, keepdims=True))
  np.testing.assert_allclose(g, want, rtol=RTOL, atol=1e-7)
  assert np.abs(np.asarray(g)).max() > 1e-3


def test_spread_first_picks_the_groups_with_spread_in_sampling_order():
  rng = np.random.default_rng(7)
  for _ in range(20):
    m, g = int(rng.integers(1, 9)), int(rng.integers(2, 5))
    r = rng.integers(0, 2, size=(m, g)).astype(np.float32)  # 0/1 rewards: many groups without spread
    n = int(rng.integers(1, m + 1))
    spread = [i for i in range(m) if len(set(r[i].tolist())) > 1]
    want = (spread + [i for i in range(m) if i not in spread])[:n]
    assert grpo.spread_first(r.reshape(-1), g, n).tolist() == want
