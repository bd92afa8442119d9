"""The pure, jittable pieces of one RL iteration: score a rollout, one update step.

What differs between algorithms comes from their record (rl/algorithms.py), looked up once.
A batch is a dict of global arrays (rl/rollout.py layout): prompt, prompt_mask [n, P];
tokens, mask [r = n * G, T]; then what scoring adds: old_logp, ref_logp, old_values [r, T] and
rm_score [r]; and what the advantages add: advantages ([r] for GRPO, [r, T] for PPO), returns [r, T].
Every per-token array is zero outside `mask`, and every mean is a masked mean.
"""
import jax
import jax.numpy as jnp
import optax

from model import heads, lm_head
from rl import algorithms, grpo, kl, rollout, value
from train import finite
from train import state as state_lib


def policy_forward(params, cfg, config, batch, g: int, value_head: bool, entropy: bool = False):
  """(logp [r, T] of the sampled tokens under the sampling distribution, its entropy [r, T] or None,
  values [r, T] from params["value_head"] or None).

  The policy of the loss is the sampling distribution: logits / rl.temperature (as TRL, verl). The
  LM head runs in config.logits_chunk positions at a time (model/lm_head.py): no [r, T, V] array."""
  _, hidden = rollout.forward(params, cfg, batch["prompt"], batch["prompt_mask"], batch["tokens"], g,
                              head=False, hidden=True)                      # [r, T, d]
  logp, ent = lm_head.token_logps(hidden, lm_head.kernel_of(params, cfg), cfg.tie_embeddings, batch["tokens"],
                                  config.logits_chunk, config.rl.temperature, entropy)
  return logp, ent, (value.values(params, hidden) if value_head else None)


def critic_values(params, cfg, batch, g: int):
  """A separate critic's V(s_t) [r, T] (no LM head computed)."""
  _, hidden = rollout.forward(params, cfg, batch["prompt"], batch["prompt_mask"], batch["tokens"], g,
                              head=False, hidden=True)
  return value.values(params, hidden)


def reward_model_scores(params, cfg, batch, g: int):
  """Reward-model score [r] as in training (model/heads.py reward_score): the head on the hidden state
  AT each completion's last token, + reward_head["logp_weight"] (if there) x its mean token log-prob."""
  inputs = jnp.pad(batch["tokens"], ((0, 0), (0, 1)))                     # [r, T + 1]
  _, hidden = rollout.forward(params, cfg, batch["prompt"], batch["prompt_mask"], inputs, g,
                              head=False, hidden=True)                     # [r, T + 1, d]
  last = jnp.sum(batch["mask"], -1)                                        # state after token L-1
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]       # [r, d]
  head, logps = params["reward_head"], None
  if "logp_weight" in head:
    logps, _ = lm_head.token_logps(hidden[:, :-1], lm_head.kernel_of(params, cfg), cfg.tie_embeddings,
                                   batch["tokens"])                        # [r, T]
  return heads.reward_score(head, h, logps, batch["mask"], head.get("logp_weight", 0.0))


def make_score_fn(cfg, config, lora_cfg, *, old: bool, ref: bool, critic_cfg=None, rm_cfg=None):
  """(trainable, frozen, ref_params, critic, rm, batch) -> {old_logp, ref_logp, old_values, rm_score}.

  `old`: the sampling policy's log-probs (needed before the first update); with `ref` and LoRA the
  reference is `frozen` itself (ref_params is None). old_values (V at sampling time) come with an
  algorithm that uses values: from the policy's value head, or from the critic (critic_cfg)."""
  g = config.rl.num_generations
  head_on_policy = algorithms.value_model(config) == "policy"

  def score(trainable, frozen, ref_params, critic, rm, batch):
    mask = batch["mask"].astype(jnp.float32)
    out = {}
    if old or head_on_policy:
      logp, _, vals = policy_forward(state_lib.to_params(trainable, frozen, lora_cfg), cfg, config, batch, g,
                                     head_on_policy)
      if old:
        out["old_logp"] = logp * mask
      if head_on_policy:
        out["old_values"] = vals * mask
    if ref:
      logp, _, _ = policy_forward(frozen if ref_params is None else ref_params, cfg, config, batch, g, False)
      out["ref_logp"] = logp * mask
    if critic_cfg is not None:
      out["old_values"] = critic_values(critic, critic_cfg, batch, g) * mask
    if rm_cfg is not None:
      out["rm_score"] = reward_model_scores(rm, rm_cfg, batch, g)
    return out

  return score


def _loss(config, algo, logp, token_entropy, vals, batch, beta):
  """The algorithm's loss and metrics on one minibatch, with the entropy (mean of token_entropy
  [r, T]) and the KL to the reference."""
  r = config.rl
  mask = batch["mask"].astype(jnp.float32)
  old = batch.get("old_logp")
  old = jax.lax.stop_gradient(logp) if old is None else old  # first pass over the rollout: pi_old = pi
  entropy = kl.masked_mean(token_entropy, mask)
  if not r.ent_coef:
    entropy = jax.lax.stop_gradient(entropy)
  per_token, extra, m = algo.loss(config, logp, old, vals, batch, entropy)   # [r, T], scalar
  m["entropy"] = entropy
  if "ref_logp" in batch:
    token_kl = kl.kl_penalty(logp, batch["ref_logp"], r.kl_estimator)    # [r, T]
    m["kl"] = kl.masked_mean(token_kl, mask)
    if algorithms.kl_placement(config) == "in_loss":
      per_token = per_token + beta * token_kl
  loss = grpo.aggregate(per_token, mask, algo.aggregation(config), r.max_new_tokens) + extra
  return loss, m


def make_update_step(cfg, config, tx, lr_fn, lora_cfg, critic_cfg=None, critic_tx=None):
  """(trainable, opt_state, critic, critic_opt, frozen, batch, beta, count) ->
  (trainable, opt_state, critic, critic_opt, logp [r, T], metrics).

  `critic`/`critic_opt` are None unless the values come from a separate critic, updated by
  `critic_tx` (rl/value.py `critic_optimizer`; default: `tx`). The returned logp (no gradient) is
  pi_old for later passes when the first pass had no old_logp. An update whose loss or gradient
  norms are not finite changes nothing (train/finite.py): metric skipped = 1."""
  g = config.rl.num_generations
  algo = algorithms.get(config.objective)
  head_on_policy = algorithms.value_model(config) == "policy"
  critic_tx = critic_tx or tx

  def loss_fn(trainable, critic, frozen, batch, beta):
    params = state_lib.to_params(trainable, frozen, lora_cfg)
    logp, ent, vals = policy_forward(params, cfg, config, batch, g, head_on_policy, entropy=True)
    if critic is not None:
      vals = critic_values(critic, critic_cfg, batch, g)
    logp = logp * batch["mask"]                                          # [r, T]
    loss, m = _loss(config, algo, logp, ent, vals, batch, beta)
    return loss, (m, jax.lax.stop_gradient(logp))

  def step(trainable, opt_state, critic, critic_opt, frozen, batch, beta, count):
    (loss, (m, logp)), (grads, critic_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        trainable, critic, frozen, batch, beta)
    m = {**m, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(count)}
    norms = [m["grad_norm"]]
    if critic is not None:
      m["critic_grad_norm"] = optax.tree.norm(critic_grads)
      norms.append(m["critic_grad_norm"])

    def update(state):
      trainable, opt_state, critic, critic_opt = state
      updates, opt_state = tx.update(grads, opt_state, trainable)
      trainable = optax.apply_updates(trainable, updates)
      if critic is not None:
        updates, critic_opt = critic_tx.update(critic_grads, critic_opt, critic)
        critic = optax.apply_updates(critic, updates)
      return trainable, opt_state, critic, critic_opt

    ok = finite.update_ok(loss, *norms)  # else: policy and critic stay as they were
    trainable, opt_state, critic, critic_opt = finite.apply_if(ok, update, (trainable, opt_state, critic,
                                                                            critic_opt))
    m["skipped"] = (~ok).astype(jnp.float32)
    return trainable, opt_state, critic, critic_opt, logp, m

  return step
