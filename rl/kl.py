"""KL to the reference policy: per-token estimators, masked means, KL controllers.

docs/algorithms.md, "KL". With the per-token log-ratio l_t = log pi(y_t) - log pi_ref(y_t)
on tokens sampled from pi:

    k1 = l_t                      unbiased, can be negative (PPO in-reward penalty)
    k2 = l_t^2 / 2                biased, >= 0
    k3 = exp(-l_t) - 1 + l_t      unbiased, >= 0, low variance (GRPO in-loss penalty)

The controller is a small dict of scalars updated by a pure function, so it can live
in the train state and be checkpointed like everything else.
"""
from __future__ import annotations

import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")


def masked_sum(x, mask, axis=None):
  """Sum of x over positions where mask == 1 (mask broadcast to x)."""
  return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None):
  """Mean of x over positions where mask == 1; an all-masked slice gives 0, not nan."""
  mask = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def k1(logp, ref_logp):
  """k1 = l. logp, ref_logp: [B, T] -> [B, T]."""
  return logp - ref_logp


def k2(logp, ref_logp):
  """k2 = l^2 / 2. [B, T] -> [B, T]."""
  return 0.5 * jnp.square(logp - ref_logp)


def k3(logp, ref_logp):
  """k3 = exp(-l) - 1 + l, with l = logp - ref_logp. [B, T] -> [B, T], always >= 0."""
  log_ratio = logp - ref_logp  # [B, T]
  return jnp.expm1(-log_ratio) + log_ratio


def kl_penalty(logp, ref_logp, kind="k3"):
  """Per-token KL estimate of kind 'k1' | 'k2' | 'k3'. [B, T] -> [B, T] (fp32).

  Not masked: multiply by the mask (or use masked_mean) before reducing.
  """
  logp = jnp.asarray(logp, jnp.float32)
  ref_logp = jnp.asarray(ref_logp, jnp.float32)
  if kind == "k1":
    return k1(logp, ref_logp)
  if kind == "k2":
    return k2(logp, ref_logp)
  if kind == "k3":
    return k3(logp, ref_logp)
  raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")


def init_kl_controller(init_beta, target=None, horizon=10000):
  """KL-coefficient controller state (a dict of fp32 scalars).

  target=None gives the fixed controller (beta never changes); otherwise the adaptive
  controller of Ziegler et al. steering the observed KL toward `target`.
  """
  return {
      "beta": jnp.asarray(init_beta, jnp.float32),
      # target <= 0 encodes "fixed", so the state stays a pytree of arrays (jit-friendly).
      "target": jnp.asarray(0.0 if target is None else target, jnp.float32),
      "horizon": jnp.asarray(horizon, jnp.float32),
  }


def update_kl_controller(state, observed_kl, n_samples):
  """One controller step; returns the new state (input untouched).

  e = clip(KL / KL_target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon),
  n = number of samples in the batch. The fixed controller returns beta unchanged.
  """
  target = state["target"]
  adaptive = target > 0
  safe_target = jnp.where(adaptive, target, 1.0)
  err = jnp.clip(observed_kl / safe_target - 1.0, -0.2, 0.2)
  new_beta = state["beta"] * (1.0 + err * n_samples / state["horizon"])
  return {**state, "beta": jnp.where(adaptive, new_beta, state["beta"]).astype(jnp.float32)}
