"""train/reward_loss.py against float64 NumPy references (docs/algorithms.md, "Reward model")."""
import jax.numpy as jnp
import numpy as np
import pytest

from train import reward_loss as rm

RTOL = 1e-5


def _rewards(seed=0, b=8):
  rng = np.random.default_rng(seed)
  return rng.normal(0.3, 1.5, b).astype(np.float32), rng.normal(-0.2, 1.5, b).astype(np.float32)


@pytest.mark.parametrize("kind,margin,centering", [
    ("bradley_terry", 0.0, 0.0), ("bradley_terry", 0.5, 0.01), ("margin_ranking", 1.0, 0.0),
    ("margin_ranking", 0.3, 0.05)])
def test_losses_match_numpy(kind, margin, centering):
  rw, rl = _rewards(int(margin * 10))
  w, l = rw.astype(np.float64), rl.astype(np.float64)
  d = w - l
  if kind == "bradley_terry":
    want = np.mean(np.logaddexp(0.0, -(d - margin)))  # -log sigmoid
  else:
    want = np.mean(np.maximum(0.0, margin - d))
  want += centering * np.mean((w + l) ** 2)
  loss, m = rm.reward_loss(jnp.asarray(rw), jnp.asarray(rl), kind=kind, margin=margin,
                           centering=centering)
  np.testing.assert_allclose(loss, want, rtol=RTOL)
  np.testing.assert_allclose(m["accuracy"], np.mean(d > 0), rtol=RTOL)
  np.testing.assert_allclose(m["chosen"], w.mean(), rtol=RTOL)
  np.testing.assert_allclose(m["rejected"], l.mean(), rtol=RTOL)
  np.testing.assert_allclose(m["margin"], d.mean(), rtol=RTOL)


def test_per_pair_margin_and_bad_kind():
  rw, rl = _rewards(3)
  margins = np.linspace(0.1, 0.8, len(rw)).astype(np.float32)
  d = rw.astype(np.float64) - rl
  loss, _ = rm.reward_loss(rw, rl, margin=margins)
  np.testing.assert_allclose(loss, np.mean(np.logaddexp(0.0, -(d - margins))), rtol=RTOL)
  with pytest.raises(ValueError):
    rm.reward_loss(rw, rl, kind="hinge")


def test_ranking_to_pairs():
  ranked = ["Paris", "It's in Europe", "Eiffel Tower"]  # "capital of France?", best first
  assert rm.ranking_to_pairs(ranked) == [("Paris", "It's in Europe"), ("Paris", "Eiffel Tower"),
                                         ("It's in Europe", "Eiffel Tower")]
  pairs = rm.ranking_to_pairs(list(range(5)))
  assert len(pairs) == 5 * 4 // 2 and all(w < l for w, l in pairs)


def test_last_token_index_and_gather_left_right_padding():
  rng = np.random.default_rng(7)
  b, t, d = 6, 9, 4
  mask = np.zeros((b, t), np.int32)
  for i in range(b):
    n = rng.integers(1, t + 1)
    start = 0 if i % 2 == 0 else t - n  # even rows right-padded, odd rows left-padded
    mask[i, start:start + n] = 1
  mask[0, 1] = 0  # a hole before the end still counts the last real token
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  want_idx = np.array([max(j for j in range(t) if mask[i, j]) for i in range(b)])
  np.testing.assert_array_equal(rm.last_token_index(jnp.asarray(mask)), want_idx)
  np.testing.assert_array_equal(rm.gather_last(jnp.asarray(hidden), jnp.asarray(mask)),
                                hidden[np.arange(b), want_idx])
  assert int(rm.last_token_index(jnp.zeros((1, t)))[0]) == 0
