"""GRPO and its family: group-relative advantages, clipped per-token loss, aggregation.

docs/algorithms.md, "GRPO family". Rollouts are laid out prompt-major: completion i of prompt p
sits at row p * G + i, so rewards [N*G] reshape to [N, G].

    A_i = (r_i - mean_group r) / (std_group r + 1e-4)      std with Bessel correction
    rho_t = exp(log pi - log pi_old)                       (GSPO: exp(mean_t log-ratio))
    l_t = -min(rho_t A_i, clip(rho_t, 1-eps_low, 1+eps_high) A_i) + beta * k3_t
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rl.kl import k3, masked_mean

SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")
AGG_MODES = ("grpo", "token_mean", "bnpo", "dr_grpo")
STD_EPS = 1e-4


def _groups(rewards, num_generations):
  """rewards [N*G] -> [N, G] fp32, checking the layout."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if num_generations < 2 or rewards.shape[0] % num_generations:
    raise ValueError(f"need num_generations >= 2 dividing {rewards.shape[0]} rewards, "
                     f"got {num_generations}")
  return rewards.reshape(-1, num_generations)


def _zero_spread(groups):
  """[N, G] -> [N] bool: every reward of the group is equal."""
  return jnp.max(groups, axis=1) == jnp.min(groups, axis=1)


def zero_spread_fraction(rewards, num_generations):
  """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
  return jnp.mean(_zero_spread(_groups(rewards, num_generations)).astype(jnp.float32))


def spread_first(rewards, num_generations: int, n: int) -> np.ndarray:
  """The n groups to train on out of those sampled (DAPO's dynamic sampling, one round): groups
  with reward spread first, then groups without, each in sampling order. rewards [M*G] (host)
  -> group indices [n], ascending within each kind."""
  groups = np.asarray(rewards).reshape(-1, num_generations)   # [M, G]
  flat = groups.max(axis=1) == groups.min(axis=1)             # [M]
  order = np.concatenate([np.flatnonzero(~flat), np.flatnonzero(flat)])
  return order[:n]


def group_advantages(rewards, num_generations, scale=None, estimator="grpo"):
  """Per-completion advantages. rewards [N*G] -> [N*G] fp32.

  estimator 'grpo': A_i = r_i - mean_group r.
  estimator 'rloo': A_i = r_i - (sum_group r - r_i) / (G - 1)  (leave-one-out baseline).
  scale: then divide by (std + 1e-4), std with Bessel correction, taken over the
  'group' or the whole 'batch'; 'none' divides by nothing (Dr. GRPO). Default (None):
  'group' for grpo, 'none' for rloo (RLOO as in docs/algorithms.md is unscaled).
  Groups whose rewards are all equal get exactly zero advantage.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
  scale = scale or ("group" if estimator == "grpo" else "none")
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
  groups = _groups(rewards, num_generations)  # [N, G]
  g = num_generations
  if estimator == "grpo":
    adv = groups - jnp.mean(groups, axis=1, keepdims=True)  # [N, G]
  else:
    adv = groups - (jnp.sum(groups, axis=1, keepdims=True) - groups) / (g - 1)
  if scale == "group":
    adv = adv / (jnp.std(groups, axis=1, ddof=1, keepdims=True) + STD_EPS)
  elif scale == "batch":
    adv = adv / (jnp.std(groups, ddof=1) + STD_EPS)
  adv = jnp.where(_zero_spread(groups)[:, None], 0.0, adv)  # no fp round-off signal
  return adv.reshape(-1)


def grpo_token_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2,
                    eps_high=None, beta=0.0, ratio_level="token"):
  """Clipped per-token surrogate (+ beta * k3 to the reference).

  logp, old_logp, ref_logp, mask: [N, T]; advantages: [N] (one per completion).
  old_logp=None means one update per rollout: pi_old = stop_gradient(pi), so the loss
  value is -A but the gradient is A * grad log pi. ref_logp may be None when beta == 0.
  ratio_level 'sequence' is GSPO: rho_i = exp(masked mean_t (logp - old_logp)),
  broadcast to every token of the row.
  Returns (per_token_loss [N, T] (not masked), metrics dict of scalars).
  """
  eps_high = eps_low if eps_high is None else eps_high
  logp = logp.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp.astype(jnp.float32)
  mask = mask.astype(jnp.float32)  # [N, T]
  adv = jnp.asarray(advantages, jnp.float32)[:, None]  # [N, 1]
  log_ratio = logp - old_logp  # [N, T]
  if ratio_level == "sequence":
    log_ratio = jnp.broadcast_to(masked_mean(log_ratio, mask, axis=-1)[:, None], logp.shape)
  elif ratio_level != "token":
    raise ValueError(f"unknown ratio_level {ratio_level!r}; expected 'token' or 'sequence'")
  ratio = jnp.exp(log_ratio)  # [N, T]
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  loss = -jnp.minimum(ratio * adv, clipped * adv)  # [N, T]
  low = (ratio < 1.0 - eps_low) & (adv < 0)  # clipped from below: gradient is cut
  high = (ratio > 1.0 + eps_high) & (adv > 0)  # clipped from above
  metrics = {
      "clip_fraction/low": masked_mean(low.astype(jnp.float32), mask),
      "clip_fraction/high": masked_mean(high.astype(jnp.float32), mask),
      "clip_fraction": masked_mean((low | high).astype(jnp.float32), mask),
      "ratio_mean": masked_mean(ratio, mask),
  }
  if ref_logp is not None:
    kl = k3(logp, ref_logp.astype(jnp.float32))  # [N, T]
    metrics["kl"] = masked_mean(kl, mask)
    if beta:
      loss = loss + beta * kl
  elif beta:
    raise ValueError("beta != 0 needs ref_logp")
  return loss, metrics


def aggregate(per_token_loss, mask, mode="grpo", max_completion_length=None):
  """Reduce a per-token loss [N, T] under mask [N, T] to a scalar.

  'grpo'               : mean_i (sum_t l m / sum_t m). Each sequence weighs the same, so a
                         token of a long completion gets 1/|y| of the weight of a token in
                         a short one: long wrong answers are penalized less per token and
                         short right answers rewarded more (length bias).
  'token_mean'/'bnpo'  : sum l m / sum m over the whole batch (DAPO). Every token weighs
                         the same within a batch, but the weight 1/sum m still changes
                         with the batch's total length.
  'dr_grpo'            : sum l m / (N * max_completion_length) (Dr. GRPO). A constant
                         denominator: per-token weight is independent of any length (no
                         length bias). max_completion_length defaults to T.
  """
  loss = per_token_loss.astype(jnp.float32) * mask  # [N, T]
  if mode == "grpo":
    per_seq = jnp.sum(loss, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)  # [N]
    return jnp.mean(per_seq)
  if mode in ("token_mean", "bnpo"):
    return jnp.sum(loss) / jnp.maximum(jnp.sum(mask), 1.0)
  if mode == "dr_grpo":
    length = per_token_loss.shape[-1] if max_completion_length is None else max_completion_length
    return jnp.sum(loss) / (per_token_loss.shape[0] * length)
  raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGG_MODES}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=None,
              beta=0.0, ratio_level="token", loss_agg="grpo", max_completion_length=None):
  """GRPO-family loss: grpo_token_loss then aggregate. Shapes as in grpo_token_loss.

  Returns (loss scalar, metrics: clip_fraction(/low,/high), ratio_mean, kl if ref given).
  """
  per_token, metrics = grpo_token_loss(logp, old_logp, ref_logp, advantages, mask,
                                       eps_low=eps_low, eps_high=eps_high, beta=beta,
                                       ratio_level=ratio_level)
  mask = mask.astype(jnp.float32)
  return aggregate(per_token, mask, loss_agg, max_completion_length), metrics
