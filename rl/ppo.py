"""PPO for language models: per-token rewards, GAE, whitening, clipped policy/value loss.

docs/algorithms.md, "PPO". All per-token arrays are [B, T] over completion tokens with a
mask [B, T] (1 on real completion tokens); masked positions never enter a sum or mean.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t
    L_pi = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps))
    L_V  = 0.5 mean_t max((V - R)^2, (V_clip - R)^2),  V_clip = V_old + clip(V - V_old, -c, c)
    L    = L_pi + vf_coef L_V - ent_coef H
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rl.kl import k3, masked_mean
from train.reward_loss import last_token_index


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
  """Generalized advantage estimation by a reverse lax.scan over time.

  rewards, values, mask: [B, T]. Masked positions are skipped: they get A = R = 0 and
  pass the running (V_next, A_next) through unchanged, so tokens after the end add
  nothing and V beyond the last valid token is 0. Returns (advantages, returns) [B, T].
  """
  rewards = rewards.astype(jnp.float32)
  values = values.astype(jnp.float32)
  mask = mask.astype(jnp.float32)

  def step(carry, xs):
    next_value, next_adv = carry  # [B], [B]
    r, v, m = xs  # [B] each
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    carry = (m * v + (1 - m) * next_value, m * adv + (1 - m) * next_adv)
    return carry, m * adv

  zeros = jnp.zeros(rewards.shape[0], jnp.float32)  # [B]
  xs = (rewards.T, values.T, mask.T)  # time-major, [T, B]
  _, adv = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
  adv = adv.T  # [B, T]
  return adv, (adv + values) * mask


def whiten(x, mask, shift_mean=True):
  """(x - mean) / sqrt(var + 1e-8), mean/var (population, ddof=0) over valid tokens.

  shift_mean=False adds the mean back (rescale only, as TRL/verl do). Masked positions
  come out 0. x, mask: [B, T] -> [B, T].
  """
  x = x.astype(jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return out * mask


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
  """Clipped PPO surrogate. logp/old_logp/mask [B, T]; advantages [B, T] (or [B]).

  Returns (loss scalar = token mean over the batch, metrics: clip_fraction (share of
  tokens where the clipped term is the larger loss), approx_kl = mean k3 estimate of
  KL(pi_old || pi), ratio_mean).
  """
  logp = logp.astype(jnp.float32)
  old_logp = old_logp.astype(jnp.float32)
  adv = jnp.asarray(advantages, jnp.float32)
  adv = adv[:, None] if adv.ndim == 1 else adv  # [B, T] or [B, 1]
  ratio = jnp.exp(logp - old_logp)  # [B, T]
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  metrics = {
      "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "approx_kl": masked_mean(k3(old_logp, logp), mask),
      "ratio_mean": masked_mean(ratio, mask),
  }
  return loss, metrics


def value_loss(values, old_values, returns, mask, clip=0.2):
  """Clipped value loss 0.5 * mean_t max((V - R)^2, (V_clip - R)^2). All [B, T].

  Returns (loss scalar, metrics: value_clip_fraction).
  """
  values = values.astype(jnp.float32)
  v_clip = old_values + jnp.clip(values - old_values, -clip, clip)  # [B, T]
  err = jnp.square(values - returns)
  err_clip = jnp.square(v_clip - returns)
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clip), mask)
  return loss, {"value_clip_fraction": masked_mean((err_clip > err).astype(jnp.float32), mask)}


def per_token_rewards(scores, kl_per_token, mask, beta):
  """PPO in-reward KL: r_t = -beta * kl_t on valid tokens + score on the last valid one.

  scores [B], kl_per_token [B, T] (usually k1), mask [B, T] -> rewards [B, T].
  """
  mask = mask.astype(jnp.float32)
  rewards = -beta * kl_per_token.astype(jnp.float32) * mask  # [B, T]
  last = jax.nn.one_hot(last_token_index(mask), mask.shape[-1]) * mask  # [B, T]
  return rewards + last * jnp.asarray(scores, jnp.float32)[:, None]


def entropy_from_logits(logits, mask):
  """Mean per-token entropy (fp32) over valid tokens. logits [B, T, V], mask [B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, T]
  return masked_mean(ent, mask)


def explained_variance(values, returns, mask):
  """1 - Var(R - V) / Var(R) over valid tokens (1e-8 added to Var(R)). 1 = perfect."""
  values = values.astype(jnp.float32)
  returns = returns.astype(jnp.float32)

  def var(x):
    return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)

  return 1.0 - var(returns - values) / (var(returns) + 1e-8)


def ppo_loss(logp, old_logp, advantages, values, old_values, returns, mask, *,
             clip_eps=0.2, value_clip=0.2, vf_coef=0.1, ent_coef=0.0, entropy=None):
  """L = L_pi + vf_coef * L_V - ent_coef * entropy. Per-token args [B, T].

  entropy: scalar (e.g. entropy_from_logits(logits, mask)), needed when ent_coef != 0.
  Returns (loss, metrics: policy_loss, value_loss, approx_kl, clip_fraction,
  value_clip_fraction, ratio_mean, explained_variance, entropy if given).
  """
  pi_loss, metrics = policy_loss(logp, old_logp, advantages, mask, clip_eps)
  v_loss, v_metrics = value_loss(values, old_values, returns, mask, value_clip)
  loss = pi_loss + vf_coef * v_loss
  if entropy is not None:
    loss = loss - ent_coef * entropy
    metrics["entropy"] = entropy
  elif ent_coef:
    raise ValueError("ent_coef != 0 needs entropy")
  metrics.update(v_metrics, policy_loss=pi_loss, value_loss=v_loss,
                 explained_variance=explained_variance(values, returns, mask))
  return loss, metrics
