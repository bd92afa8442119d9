"""Online algorithms: what an RL stage optimises. Each is a small record chosen by `config.objective`.

The iteration (rl/loop.py, rl/steps.py) is the same for all: sample, score (the sampling policy's
and the reference's log-probs, values, a reward model), advantages, then minibatch updates of

    loss = aggregate(per_token + beta * kl_t [KL in the loss], mask) + extra

A record says what differs (docs/algorithms.md):
- `advantages(config, scores [r], batch, beta)` -> arrays added to the batch: "advantages"
  ([r] or [r, T]) and whatever its loss also reads ("returns" for PPO);
- `loss(config, logp, old_logp, values, batch, entropy)` -> (per-token loss [r, T] before the KL
  and the aggregation, a scalar added after it, metrics: each is logged as train/<name>);
- `aggregation(config)`: how the per-token loss becomes a scalar (rl/grpo.py AGG_MODES);
- `kl_placement`: where the KL to the reference goes unless rl.kl_placement says: "in_loss"
  (a per-token penalty of the loss) or "in_reward" (subtracted from the rewards);
- `uses_values`: it needs V(s_t). The score pass then adds "old_values" [r, T] (the value model at
  sampling time), and rl.value_model says where V lives: a head on the policy or a separate critic;
- `min_generations`: completions per prompt its advantages need.

GRPO's family: the records grpo, rloo (leave-one-out baseline) and gspo (sequence-level ratio);
DAPO's clip-higher (rl.eps_high=0.28) and the aggregations of DAPO and Dr. GRPO (rl.loss_agg=
token_mean | dr_grpo), rl.scale, and the same choices as keys (rl.estimator, rl.ratio_level) apply
to each.
Adding an algorithm = adding a record to ALGORITHMS.
"""
import dataclasses
import functools
from typing import Callable

import jax.numpy as jnp

from configs.errors import UserError, closest
from rl import grpo, kl, ppo


@dataclasses.dataclass(frozen=True)
class Algorithm:
  name: str
  advantages: Callable   # (config, scores [r], batch, beta) -> {"advantages": ..., ...}
  loss: Callable         # (config, logp, old_logp, values, batch, entropy) -> (per_token, extra, metrics)
  aggregation: Callable  # config -> rl/grpo.py aggregation mode of the per-token loss
  kl_placement: str      # default of rl.kl_placement: "in_loss" | "in_reward"
  uses_values: bool = False  # needs a value model (rl.value_model); the score pass adds old_values
  min_generations: int = 1   # completions per prompt the advantages need


def kl_placement(config) -> str:
  """Where the KL to the reference goes: rl.kl_placement, or the algorithm's default."""
  return config.rl.kl_placement or get(config.objective).kl_placement


def value_model(config):
  """Where V(s_t) lives in this run: None (the algorithm needs none), "policy" or "critic"."""
  return config.rl.value_model if get(config.objective).uses_values else None


def rollout_kl(batch, kind: str):
  """Per-token KL of the sampling policy to the reference [r, T] (0 off the mask), or None."""
  if "ref_logp" not in batch or "old_logp" not in batch:
    return None
  return kl.kl_penalty(batch["old_logp"], batch["ref_logp"], kind) * batch["mask"]


# ----------------------------------------------------------------------------- GRPO family


def grpo_advantages(config, scores, batch, beta, estimator: str = "") -> dict:
  """{"advantages": A_i [r]}: group-relative (estimator, default rl.estimator: "grpo" or "rloo");
  with the KL in the reward, scores first lose beta * sum_t kl_t."""
  r = config.rl
  token_kl = rollout_kl(batch, r.kl_estimator)
  if kl_placement(config) == "in_reward" and token_kl is not None:
    scores = scores - beta * jnp.sum(token_kl, -1)
  return {"advantages": grpo.group_advantages(scores, r.num_generations, r.scale or None,
                                                 estimator or r.estimator)}


def grpo_loss(config, logp, old_logp, values, batch, entropy, ratio_level: str = ""):
  """The clipped per-token surrogate, and -ent_coef * entropy. ratio_level (default
  rl.ratio_level): "token" (GRPO) or "sequence" (GSPO: one length-normalised ratio per completion)."""
  del values
  r = config.rl
  per_token, metrics = grpo.grpo_token_loss(logp, old_logp, None, batch["advantages"],
                                            batch["mask"].astype(jnp.float32), eps_low=r.eps_low,
                                            eps_high=r.eps_high, ratio_level=ratio_level or r.ratio_level)
  return per_token, -r.ent_coef * entropy, metrics


# ----------------------------------------------------------------------------- PPO


def ppo_advantages(config, scores, batch, beta) -> dict:
  """{"advantages", "returns"} [r, T]: the score on the last token (+ -beta * kl per token with
  the KL in the reward), GAE over old_values, whitening."""
  r = config.rl
  mask = batch["mask"].astype(jnp.float32)
  token_kl = rollout_kl(batch, r.kl_estimator)
  if kl_placement(config) != "in_reward" or token_kl is None:
    token_kl = jnp.zeros_like(mask)
  rewards = ppo.per_token_rewards(scores, token_kl, mask, beta)            # [r, T]
  if r.whiten_rewards:
    rewards = ppo.whiten(rewards, mask, shift_mean=False)
  adv, returns = ppo.gae(rewards, batch["old_values"], mask, r.gamma, r.lam)
  if r.whiten_advantages:
    adv = ppo.whiten(adv, mask)
  return {"advantages": adv, "returns": returns}


def ppo_loss(config, logp, old_logp, values, batch, entropy):
  """Nothing per token (only the KL, if in the loss); the clipped policy + value - entropy loss."""
  r = config.rl
  mask = batch["mask"].astype(jnp.float32)
  loss, metrics = ppo.ppo_loss(logp, old_logp, batch["advantages"], values, batch["old_values"],
                               batch["returns"], mask, clip_eps=r.eps_low, value_clip=r.value_clip,
                               vf_coef=r.vf_coef, ent_coef=r.ent_coef, entropy=entropy)
  return jnp.zeros_like(mask), loss, metrics


# ----------------------------------------------------------------------------- registry


def _rl_loss_agg(config) -> str:
  return config.rl.loss_agg


ALGORITHMS = {
    "grpo": Algorithm("grpo", grpo_advantages, grpo_loss, _rl_loss_agg, kl_placement="in_loss",
                      min_generations=2),
    # GRPO with a leave-one-out baseline and no std scaling (unless rl.scale says)
    "rloo": Algorithm("rloo", functools.partial(grpo_advantages, estimator="rloo"), grpo_loss, _rl_loss_agg,
                      kl_placement="in_loss", min_generations=2),
    # GRPO with one sequence-level importance ratio per completion
    "gspo": Algorithm("gspo", grpo_advantages, functools.partial(grpo_loss, ratio_level="sequence"),
                      _rl_loss_agg, kl_placement="in_loss", min_generations=2),
    "ppo": Algorithm("ppo", ppo_advantages, ppo_loss, aggregation=lambda config: "token_mean",
                     kl_placement="in_reward", uses_values=True),
}


def get(name: str) -> Algorithm:
  if name not in ALGORITHMS:
    near = closest(name, ALGORITHMS)
    raise UserError(f"config.objective={name!r}: the online algorithms are {sorted(ALGORITHMS)}"
                    + (f" (did you mean {near!r}?)" if near else ""))
  return ALGORITHMS[name]
