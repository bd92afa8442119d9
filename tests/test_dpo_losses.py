"""train/dpo_loss.py against float64 NumPy references (docs/algorithms.md, "DPO family")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import dpo_loss as dpo

RTOL, ATOL = 1e-5, 1e-6


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _batch(seed=0, b=6):
  """Summed log-probs consistent with lengths, so averages are in (-3, -0.05)."""
  rng = np.random.default_rng(seed)
  len_c = rng.integers(3, 20, b).astype(np.float32)
  len_r = rng.integers(3, 20, b).astype(np.float32)
  pc = (rng.uniform(-3, -0.05, b) * len_c).astype(np.float32)
  pr = (rng.uniform(-3, -0.05, b) * len_r).astype(np.float32)
  rc = (pc + rng.normal(0, 2, b)).astype(np.float32)
  rr = (pr + rng.normal(0, 2, b)).astype(np.float32)
  return pc, pr, rc, rr, len_c, len_r


def _numpy_loss(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma, lam, alpha=0.0):
  pc, pr, rc, rr, lc, lr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr, lc, lr))
  hw, hl = pc - rc, pr - rr
  d = hw - hl
  if kind in ("sigmoid", "cdpo"):
    losses = -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
  elif kind == "robust":
    losses = (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps)
  elif kind == "ipo":
    losses = (hw / lc - hl / lr - 1 / (2 * beta)) ** 2
  elif kind == "simpo":
    losses = -_logsig(beta * (pc / lc - pr / lr) - gamma)
  else:
    aw, al = pc / lc, pr / lr
    log_odds = (aw - al) - (np.log(1 - np.exp(aw)) - np.log(1 - np.exp(al)))
    losses = -aw - lam * _logsig(log_odds)
  return (losses + alpha * (-pc / lc)).mean()


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("cdpo", 0.1), ("robust", 0.2),
                                      ("ipo", 0.0), ("simpo", 0.0), ("orpo", 0.0)])
def test_losses_match_numpy(kind, eps):
  pc, pr, rc, rr, lc, lr = _batch(len(kind) + int(eps * 10))
  beta, gamma, lam = 0.3, 0.7, 0.25
  ref_free = kind in ("simpo", "orpo")
  loss, m = dpo.preference_loss(pc, pr, None if ref_free else rc, None if ref_free else rr,
                                lc, lr, loss_type=kind, beta=beta, label_smoothing=eps,
                                gamma=gamma, orpo_lambda=lam)
  want = _numpy_loss(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma, lam)
  np.testing.assert_allclose(loss, want, rtol=RTOL)
  f = lambda x: np.asarray(x, np.float64)
  hw, hl = (f(pc) / lc, f(pr) / lr) if ref_free else (f(pc) - rc, f(pr) - rr)
  np.testing.assert_allclose(m["rewards/chosen"], beta * hw.mean(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(m["rewards/rejected"], beta * hl.mean(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(m["rewards/margin"], beta * (hw - hl).mean(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(m["rewards/accuracy"], (hw > hl).mean(), rtol=RTOL)
  np.testing.assert_allclose(m["logps/chosen"], f(pc).mean(), rtol=RTOL)
  np.testing.assert_allclose(m["logps/rejected"], f(pr).mean(), rtol=RTOL)
  if kind == "orpo":
    np.testing.assert_allclose(m["nll"], -hw.mean(), rtol=RTOL)
    lo = (hw - hl) - (np.log1p(-np.exp(hw)) - np.log1p(-np.exp(hl)))
    np.testing.assert_allclose(m["log_odds"], lo.mean(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo"])
def test_rpo_alpha_adds_the_chosen_average_nll(kind):
  pc, pr, rc, rr, lc, lr = _batch(11 + len(kind))
  ref_free = kind == "simpo"
  loss, m = dpo.preference_loss(pc, pr, None if ref_free else rc, None if ref_free else rr, lc, lr,
                                loss_type=kind, beta=0.3, gamma=0.7, rpo_alpha=0.8)
  want = _numpy_loss(kind, pc, pr, rc, rr, lc, lr, 0.3, 0.0, 0.7, 0.0, alpha=0.8)
  np.testing.assert_allclose(loss, want, rtol=RTOL)
  np.testing.assert_allclose(m["nll"], (-np.asarray(pc, np.float64) / lc).mean(), rtol=RTOL)
  # its gradient pulls every chosen log-prob up by alpha / length more than the plain loss does
  grad = lambda a: jax.grad(lambda x: dpo.preference_loss(
      x, pr, None if ref_free else rc, None if ref_free else rr, lc, lr, loss_type=kind, beta=0.3,
      gamma=0.7, rpo_alpha=a)[0])(jnp.asarray(pc))
  np.testing.assert_allclose(grad(0.8) - grad(0.0), -0.8 / lc / len(pc), rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="rpo_alpha"):
    dpo.preference_loss(pc, pr, None, None, lc, lr, loss_type="orpo", rpo_alpha=0.5)


@pytest.mark.parametrize("kind", ["sigmoid", "cdpo", "robust"])
def test_policy_equals_reference_gives_log2(kind):
  pc, pr, _, _, lc, lr = _batch(3)
  loss, m = dpo.preference_loss(pc, pr, pc, pr, lc, lr, loss_type=kind,
                                label_smoothing=0.0 if kind == "sigmoid" else 0.1)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert float(m["rewards/chosen"]) == 0.0 and float(m["rewards/rejected"]) == 0.0


def test_reference_required_except_simpo_orpo():
  pc, pr, _, _, lc, lr = _batch(4)
  for kind in ("sigmoid", "cdpo", "robust", "ipo"):
    with pytest.raises(ValueError):
      dpo.preference_loss(pc, pr, None, None, lc, lr, loss_type=kind)
  with pytest.raises(ValueError):
    dpo.preference_loss(pc, pr, pc, pr, lc, lr, loss_type="nope")


def test_sequence_logps_match_numpy():
  rng = np.random.default_rng(5)
  b, t, v = 3, 7, 11
  logits = rng.normal(0, 3, (b, t, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, t))
  mask = (rng.random((b, t)) < 0.7).astype(np.float32)
  x = logits.astype(np.float64)
  logsm = x - x.max(-1, keepdims=True)
  logsm = logsm - np.log(np.exp(logsm).sum(-1, keepdims=True))
  tok = np.take_along_axis(logsm, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(dpo.token_logps(jnp.asarray(logits), jnp.asarray(targets)), tok,
                             rtol=RTOL, atol=ATOL)
  s, n = dpo.sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(s, (tok * mask).sum(-1), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(n, mask.sum(-1))
  s_bf16, _ = dpo.sequence_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                                 jnp.asarray(mask))
  assert s_bf16.dtype == jnp.float32  # log-softmax in fp32 whatever the compute dtype


def test_gradient_step_raises_chosen_margin():
  rng = np.random.default_rng(6)
  t, v = 5, 8
  ref_logits = jnp.asarray(rng.normal(0, 1, (2, t, v)), jnp.float32)  # rows: chosen, rejected
  targets = jnp.asarray(rng.integers(0, v, (2, t)))
  mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], jnp.float32)
  ref_s, n = dpo.sequence_logps(ref_logits, targets, mask)

  def margin(logits):
    s, _ = dpo.sequence_logps(logits, targets, mask)
    return (s[0] - ref_s[0]) - (s[1] - ref_s[1])

  def loss(logits):
    s, _ = dpo.sequence_logps(logits, targets, mask)
    return dpo.preference_loss(s[:1], s[1:], ref_s[:1], ref_s[1:], n[:1], n[1:])[0]

  margin, loss = jax.jit(margin), jax.jit(loss)
  logits = ref_logits + jnp.asarray(rng.normal(0, 0.5, (2, t, v)), jnp.float32)
  new = logits - 1.0 * jax.jit(jax.grad(loss))(logits)
  assert float(margin(new)) > float(margin(logits))
  assert float(loss(new)) < float(loss(logits))
