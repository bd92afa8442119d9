"""The pure, jittable pieces of one RL iteration: score a rollout, advantages, one update step.

A batch is a dict of global arrays (rl/rollout.py layout): prompt, prompt_mask [n, P];
tokens, mask [r = n * G, T]; then what scoring adds: old_logp, ref_logp, values [r, T] and
rm_score [r]; and what the advantages add: advantages ([r] for GRPO, [r, T] for PPO), returns [r, T].
Every per-token array is zero outside `mask`, and every mean is a masked mean.
"""
import jax
import jax.numpy as jnp
import optax

from model import heads
from rl import grpo, kl, ppo, rollout, value
from rl.config import placement
from train.dpo_loss import token_logps
from train import state as state_lib


def policy_forward(params, cfg, batch, g: int, value_head: bool):
  """(logits [r, T, V], values [r, T] from params["value_head"] or None)."""
  logits, hidden = rollout.forward(params, cfg, batch["prompt"], batch["prompt_mask"], batch["tokens"], g,
                                   hidden=value_head)
  return logits, (value.values(params, hidden) if value_head else None)


def critic_values(params, cfg, batch, g: int):
  """A separate critic's V(s_t) [r, T] (no LM head computed)."""
  _, hidden = rollout.forward(params, cfg, batch["prompt"], batch["prompt_mask"], batch["tokens"], g,
                              head=False, hidden=True)
  return value.values(params, hidden)


def reward_model_scores(params, cfg, batch, g: int):
  """Reward-head score [r] of the hidden state AT each completion's last token (as in training)."""
  inputs = jnp.pad(batch["tokens"], ((0, 0), (0, 1)))                     # [r, T + 1]
  _, hidden = rollout.forward(params, cfg, batch["prompt"], batch["prompt_mask"], inputs, g,
                              head=False, hidden=True)                     # [r, T + 1, d]
  last = jnp.sum(batch["mask"], -1)                                        # state after token L-1
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]       # [r, d]
  return heads.scalar_head(params["reward_head"], h)


def tempered(config, logits):
  """The policy of the loss is the sampling distribution: logits / temperature (as TRL, verl)."""
  t = config.rl.temperature
  return logits if t == 1.0 else logits / t


def make_score_fn(cfg, config, lora_cfg, *, old: bool, ref: bool, critic_cfg=None, rm_cfg=None):
  """(trainable, frozen, ref_params, critic, rm, batch) -> {old_logp, ref_logp, values, rm_score}.

  `old`: the sampling policy's log-probs (needed before the first update); with `ref` and LoRA the
  reference is `frozen` itself (ref_params is None)."""
  g = config.rl.num_generations
  head_on_policy = config.objective == "ppo" and config.rl.value_model == "policy"

  def score(trainable, frozen, ref_params, critic, rm, batch):
    mask = batch["mask"].astype(jnp.float32)
    out = {}
    if old or head_on_policy:
      logits, vals = policy_forward(state_lib.to_params(trainable, frozen, lora_cfg), cfg, batch, g,
                                    head_on_policy)
      if old:
        out["old_logp"] = token_logps(tempered(config, logits), batch["tokens"]) * mask
      if head_on_policy:
        out["values"] = vals * mask
    if ref:
      logits, _ = policy_forward(frozen if ref_params is None else ref_params, cfg, batch, g, False)
      out["ref_logp"] = token_logps(tempered(config, logits), batch["tokens"]) * mask
    if critic_cfg is not None:
      out["values"] = critic_values(critic, critic_cfg, batch, g) * mask
    if rm_cfg is not None:
      out["rm_score"] = reward_model_scores(rm, rm_cfg, batch, g)
    return out

  return score


def rollout_kl(batch, kind: str):
  """Per-token KL of the sampling policy to the reference [r, T] (0 off the mask), or None."""
  if "ref_logp" not in batch or "old_logp" not in batch:
    return None
  return kl.kl_penalty(batch["old_logp"], batch["ref_logp"], kind) * batch["mask"]


def grpo_advantages(config, scores, batch, beta):
  """A_i [r]; with the KL in the reward, scores first lose beta * sum_t kl_t."""
  r = config.rl
  token_kl = rollout_kl(batch, r.kl_estimator)
  if placement(config) == "in_reward" and token_kl is not None:
    scores = scores - beta * jnp.sum(token_kl, -1)
  return grpo.group_advantages(scores, r.num_generations, r.scale or None, r.estimator)


def ppo_advantages(config, scores, batch, beta):
  """(advantages, returns) [r, T]: score on the last token (+ -beta * kl per token), GAE, whitening."""
  r = config.rl
  mask = batch["mask"].astype(jnp.float32)
  token_kl = rollout_kl(batch, r.kl_estimator)
  if placement(config) != "in_reward" or token_kl is None:
    token_kl = jnp.zeros_like(mask)
  rewards = ppo.per_token_rewards(scores, token_kl, mask, beta)            # [r, T]
  if r.whiten_rewards:
    rewards = ppo.whiten(rewards, mask, shift_mean=False)
  adv, returns = ppo.gae(rewards, batch["values"], mask, r.gamma, r.lam)
  if r.whiten_advantages:
    adv = ppo.whiten(adv, mask)
  return adv, returns


def _loss(config, logp, logits, vals, batch, beta):
  """The objective's loss and metrics on one minibatch."""
  r = config.rl
  mask = batch["mask"].astype(jnp.float32)
  old = batch.get("old_logp")
  old = jax.lax.stop_gradient(logp) if old is None else old  # first pass over the rollout: pi_old = pi
  entropy = ppo.entropy_from_logits(logits, mask)
  if not r.ent_coef:
    entropy = jax.lax.stop_gradient(entropy)
  if config.objective == "grpo":
    per_token, m = grpo.grpo_token_loss(logp, old, None, batch["advantages"], mask, eps_low=r.eps_low,
                                        eps_high=r.eps_high, ratio_level=r.ratio_level)
    extra = -r.ent_coef * entropy
  else:
    loss, m = ppo.ppo_loss(logp, old, batch["advantages"], vals, batch["old_values"], batch["returns"],
                           mask, clip_eps=r.eps_low, value_clip=r.value_clip, vf_coef=r.vf_coef,
                           ent_coef=r.ent_coef, entropy=entropy)
    per_token, extra = jnp.zeros_like(mask), loss
  m["entropy"] = entropy
  if "ref_logp" in batch:
    token_kl = kl.kl_penalty(logp, batch["ref_logp"], r.kl_estimator)    # [r, T]
    m["kl"] = kl.masked_mean(token_kl, mask)
    if placement(config) == "in_loss":
      per_token = per_token + beta * token_kl
  agg = r.loss_agg if config.objective == "grpo" else "token_mean"
  loss = grpo.aggregate(per_token, mask, agg, r.max_new_tokens) + extra
  return loss, m


def make_update_step(cfg, config, tx, lr_fn, lora_cfg, critic_cfg=None):
  """(trainable, opt_state, critic, critic_opt, frozen, batch, beta, count) ->
  (trainable, opt_state, critic, critic_opt, logp [r, T], metrics).

  `critic`/`critic_opt` are None unless PPO has a separate critic (same optimizer settings). The
  returned logp (no gradient) is pi_old for later passes when the first pass had no old_logp."""
  g = config.rl.num_generations
  head_on_policy = config.objective == "ppo" and config.rl.value_model == "policy"

  def loss_fn(trainable, critic, frozen, batch, beta):
    params = state_lib.to_params(trainable, frozen, lora_cfg)
    logits, vals = policy_forward(params, cfg, batch, g, head_on_policy)
    logits = tempered(config, logits)
    if critic is not None:
      vals = critic_values(critic, critic_cfg, batch, g)
    logp = token_logps(logits, batch["tokens"]) * batch["mask"]          # [r, T]
    loss, m = _loss(config, logp, logits, vals, batch, beta)
    return loss, (m, jax.lax.stop_gradient(logp))

  def step(trainable, opt_state, critic, critic_opt, frozen, batch, beta, count):
    (loss, (m, logp)), (grads, critic_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        trainable, critic, frozen, batch, beta)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    m = {**m, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(count)}
    if critic is not None:
      updates, critic_opt = tx.update(critic_grads, critic_opt, critic)
      critic = optax.apply_updates(critic, updates)
      m["critic_grad_norm"] = optax.tree.norm(critic_grads)
    return trainable, opt_state, critic, critic_opt, logp, m

  return step
