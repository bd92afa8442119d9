"""Offline preference losses: DPO (sigmoid), cDPO, robust DPO, IPO, SimPO, ORPO.

docs/algorithms.md, "DPO family". Inputs are SUMMED per-sequence log-probs [B] of the chosen
(y_w) and rejected (y_l) completions and their token counts [B]; an average log-prob
is sum / length. With h = log pi(y|x) - log pi_ref(y|x) and Delta = h_w - h_l:

    sigmoid / cdpo : -(1-eps) log s(b Delta) - eps log s(-b Delta)     (eps=0: plain DPO)
    robust         : [-(1-eps) log s(b Delta) + eps log s(-b Delta)] / (1 - 2 eps)
    ipo            : (h_w/|y_w| - h_l/|y_l| - 1/(2b))^2
    simpo          : -log s(b (avg_w - avg_l) - gamma)                  (no reference)
    orpo           : NLL(y_w) - lambda log s(log_odds)                  (no reference)

Every loss is a mean over the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "cdpo", "robust", "ipo", "simpo", "orpo")
_REFERENCE_FREE = ("simpo", "orpo")
_USES_SMOOTHING = ("sigmoid", "cdpo", "robust")


def token_logps(logits, targets):
  """log p(target) per position in fp32. logits [B, T, V], targets [B, T] -> [B, T].

  Gathers the target logit and subtracts logsumexp, so no [B, T, V] log-softmax is kept.
  """
  logits = logits.astype(jnp.float32)  # [B, T, V]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(logits, targets, mask):
  """Summed log-prob and token count per row. logits [B, T, V], targets/mask [B, T].

  Returns (sum_logp [B], n_tokens [B]); only mask == 1 positions count.
  """
  mask = mask.astype(jnp.float32)  # [B, T]
  return jnp.sum(token_logps(logits, targets) * mask, axis=-1), jnp.sum(mask, axis=-1)


def _log1mexp(a):
  """log(1 - exp(a)) for a < 0, stable at both ends."""
  a = jnp.minimum(a, -1e-6)  # a == 0 would be log(0)
  return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def _smoothed_sigmoid(logits, eps):
  """cDPO: -(1-eps) log s(x) - eps log s(-x). logits [B]."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, chosen_lengths, rejected_lengths, *,
                    loss_type="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5,
                    orpo_lambda=0.1, rpo_alpha=0.0):
  """One preference loss. All array args are [B]; returns (loss scalar, metrics dict).

  policy_*/ref_*_logps: summed log-probs; *_lengths: completion token counts.
  ref_* may be None for 'simpo' and 'orpo' (ignored there); required otherwise.
  Lengths are needed by 'ipo', 'simpo', 'orpo' (average log-probs).
  label_smoothing: eps of 'sigmoid'/'cdpo'/'robust' (the same formula for the first
  two, as in TRL; eps = 0 is plain DPO). gamma: SimPO target margin.
  orpo_lambda: weight of the odds-ratio term. For simpo/orpo the logged "rewards" are
  beta * average log-probs of the policy (there is no reference).
  rpo_alpha: adds rpo_alpha * (the chosen completion's average NLL, -policy_chosen_logps /
  chosen_length) to every pair's loss (RPO; TRL's rpo_alpha, which averages over all chosen
  tokens of the batch instead): it keeps the chosen answers likely while the margin grows.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  if label_smoothing and loss_type not in _USES_SMOOTHING:
    raise ValueError(f"label_smoothing is not used by loss_type {loss_type!r}")
  if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
    raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)  # [B]
  if rpo_alpha and loss_type == "orpo":
    raise ValueError("rpo_alpha: orpo already has the chosen NLL term (orpo_lambda weighs the other)")
  if loss_type in ("ipo", "simpo", "orpo") or rpo_alpha:
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError(f"loss_type {loss_type!r} (or rpo_alpha) needs chosen/rejected lengths")
    len_c = jnp.maximum(f32(chosen_lengths), 1.0)  # [B]
    len_r = jnp.maximum(f32(rejected_lengths), 1.0)  # [B]

  metrics = {}
  if loss_type in _REFERENCE_FREE:
    h_w, h_l = pc / len_c, pr / len_r  # average log-probs, [B]
  else:
    if ref_chosen_logps is None or ref_rejected_logps is None:
      raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
    h_w, h_l = pc - f32(ref_chosen_logps), pr - f32(ref_rejected_logps)  # [B]
  delta = h_w - h_l  # [B]

  if loss_type in ("sigmoid", "cdpo"):
    losses = _smoothed_sigmoid(beta * delta, label_smoothing)
  elif loss_type == "robust":
    eps = label_smoothing
    losses = (-(1 - eps) * jax.nn.log_sigmoid(beta * delta)
              + eps * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
  elif loss_type == "ipo":
    losses = jnp.square(h_w / len_c - h_l / len_r - 1.0 / (2.0 * beta))
  elif loss_type == "simpo":
    losses = -jax.nn.log_sigmoid(beta * delta - gamma)
  else:  # orpo; h_w, h_l are the average log-probs a_w, a_l
    log_odds = delta - (_log1mexp(h_w) - _log1mexp(h_l))  # [B]
    nll = -h_w  # per-sequence average NLL of the chosen completion, [B]
    odds_term = jax.nn.log_sigmoid(log_odds)  # [B]
    losses = nll - orpo_lambda * odds_term
    metrics.update({"nll": jnp.mean(nll), "log_odds": jnp.mean(log_odds),
                    "log_odds_ratio": jnp.mean(odds_term)})

  if rpo_alpha:
    nll = -pc / len_c  # [B]
    losses = losses + rpo_alpha * nll
    metrics["nll"] = jnp.mean(nll)

  metrics.update({
      "rewards/chosen": jnp.mean(beta * h_w),
      "rewards/rejected": jnp.mean(beta * h_l),
      "rewards/accuracy": jnp.mean((h_w > h_l).astype(jnp.float32)),
      "rewards/margin": jnp.mean(beta * delta),
      "logps/chosen": jnp.mean(pc),
      "logps/rejected": jnp.mean(pr),
  })
  return jnp.mean(losses), metrics
