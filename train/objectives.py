"""Objectives: what a stage optimises. Each is a small record chosen by `config.objective`.

A loss `loss(params, batch, model, ctx)` returns (numerator, denominator, metric sums) rather than a
mean, so gradient accumulation and multi-batch evaluation stay exact: the step's loss is
sum(numerators) / sum(denominators) (tokens for pretrain / sft, pairs for reward_model / dpo).
`ctx` carries the stage config and the frozen reference params (or None).

Besides the loss, an objective may bring its own batches (`make_batches`), need a reference model
(`needs_reference(config)`), own extra trainable params merged at the top level of the params tree
(`extra_params(model_cfg, rng)`, e.g. the reward head) and check its config section (`check`).
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from configs.errors import UserError, closest
from model import heads, lm_head
from train import dpo_loss as dpo
from train import formats, pairs
from train import reward_loss as rm


REFERENCE_FREE = ("simpo", "orpo")        # DPO losses without a reference model
SMOOTHED = ("sigmoid", "cdpo", "robust")  # DPO losses that take label_smoothing


@dataclasses.dataclass(frozen=True)
class Context:
  config: Any = None      # the stage config: loss options live in its sections (config.dpo, ...)
  ref_params: Any = None  # the frozen reference model's params, or None


def logits_chunk(ctx) -> int:
  """config.logits_chunk of the stage (0 = the LM head in one piece)."""
  return ctx.config.logits_chunk if ctx is not None and ctx.config is not None else 0


def next_token_loss(params, batch, model, ctx=None):
  """Masked next-token cross-entropy over a packed batch (pretraining and SFT).

  batch: inputs, targets, segment_ids, positions [b, t] int32; loss_mask [b, t] float32.
  The head runs in `config.logits_chunk` positions at a time (model/lm_head.py `token_nll`).
  """
  _, hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                          return_hidden=True, head=False)  # [b, t, d]
  nll, hit = lm_head.token_nll(hidden, lm_head.kernel_of(params, model.cfg), model.cfg.tie_embeddings,
                               batch["targets"], logits_chunk(ctx))  # [b, t] each
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask), {"accuracy": jnp.sum(hit * mask)}


# ----------------------------------------------------------------------------- pairs


def pair_hidden(params, batch, model):
  """The final hidden states of the pair rows (train/pairs.py): [R, L, d]."""
  _, hidden = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                          return_hidden=True, head=False, branch_ids=batch["branch_ids"])
  return hidden


def completion_logps(params, hidden, batch, model, chunk: int = 0):
  """Per-token completion log-probs [R, K] and the masks of each pair slot's chosen / rejected tokens
  [R, K, 2G] (2g chosen, 2g + 1 rejected of the row's pair slot g; G pair slots per row).

  The lm head runs only at the logit_slots [R, K] that predict the completion tokens, `chunk` slots
  at a time (model/lm_head.py)."""
  h = jnp.take_along_axis(hidden, batch["logit_slots"][..., None], 1)  # [R, K, d]
  logps, _ = lm_head.token_logps(h, lm_head.kernel_of(params, model.cfg), model.cfg.tie_embeddings,
                                 batch["targets"], chunk)  # [R, K]
  G = batch["weight"].size // batch["weight"].shape[0]
  which = 2 * batch["target_pair"] + batch["target_branch"] - 1  # [R, K]: < 0 none
  return logps, (which[..., None] == jnp.arange(2 * G)).astype(jnp.float32)


def pair_logps(params, batch, model, chunk: int = 0):
  """Summed completion log-probs and completion lengths, each [P, 2] (0 = chosen, 1 = rejected).

  Rows [prompt | chosen | rejected]... of R rows, one pair or G packed pairs each (train/pairs.py),
  P = R G pair slots."""
  logps, masks = completion_logps(params, pair_hidden(params, batch, model), batch, model, chunk)
  return (jnp.einsum("rk,rkj->rj", logps, masks).reshape(-1, 2), jnp.sum(masks, 1).reshape(-1, 2))


def pair_rewards(params, batch, model, logp_weight: float = 0.0, chunk: int = 0):
  """Reward-model score of the chosen and of the rejected completion (model/heads.py reward_score:
  the head on the last token's state, + logp_weight x the mean token log-prob) -> [P, 2]."""
  hidden = pair_hidden(params, batch, model)  # [R, L, d]
  R = hidden.shape[0]
  last = jnp.take_along_axis(hidden, batch["ends"].reshape(R, -1, 1), 1)  # [R, 2G, d]
  last = last.reshape(-1, 2, last.shape[-1])  # [P, 2, d]
  logps = masks = None
  if logp_weight:
    logps, masks = completion_logps(params, hidden, batch, model, chunk)  # [R, K], [R, K, 2G]
    logps = jnp.broadcast_to(logps[:, None], (R, masks.shape[-1] // 2, logps.shape[-1]))  # [R, G, K]
    logps = logps.reshape(-1, 1, logps.shape[-1])  # [P, 1, K]
    masks = jnp.swapaxes(masks, 1, 2).reshape(-1, 2, masks.shape[1])  # [P, 2, K]
  return heads.reward_score(params["reward_head"], last, logps, masks, logp_weight)


def _weighted(weight, losses, metrics):
  """Per-pair losses / metrics [P] -> (sum, number of pairs, sums): padding pairs weigh 0."""
  weight = weight.reshape(-1)  # [P]: [R] or [R, G] per pair slot
  return (jnp.sum(weight * losses), jnp.sum(weight),
          {k: jnp.sum(weight * v) for k, v in metrics.items()})


def reward_loss(params, batch, model, ctx):
  """Pairwise reward-model loss (config.reward) over a batch of pairs."""
  c = ctx.config.reward
  r = pair_rewards(params, batch, model, c.logp_weight, logits_chunk(ctx))  # [P, 2]
  one = lambda w, l: rm.reward_loss(w[None], l[None], kind=c.loss, margin=c.margin, centering=c.centering)
  losses, m = jax.vmap(one)(r[:, 0], r[:, 1])  # [P], {k: [P]}
  metrics = {"rewards/accuracy": m["accuracy"], "rewards/chosen": m["chosen"],
             "rewards/rejected": m["rejected"], "rewards/margin": m["margin"]}
  return _weighted(batch["weight"], losses, metrics)


def reference_logps(batch, model, ctx):
  """[P, 2] reference log-probs: precomputed in the batch, or a forward pass of ctx.ref_params."""
  if "ref_logps" in batch:
    return batch["ref_logps"].reshape(-1, 2)
  if ctx.ref_params is None:
    return None
  return jax.lax.stop_gradient(pair_logps(ctx.ref_params, batch, model, logits_chunk(ctx))[0])


def dpo_loss(params, batch, model, ctx):
  """The DPO family (config.dpo.loss) over a batch of pairs, with TRL's metrics and a KL proxy."""
  c = ctx.config.dpo
  logps, n = pair_logps(params, batch, model, logits_chunk(ctx))  # [P, 2]
  ref = None if c.loss in REFERENCE_FREE else reference_logps(batch, model, ctx)

  def one(pc, pr, rc, rr, nc, nr):
    r = lambda x: None if x is None else x[None]
    return dpo.preference_loss(pc[None], pr[None], r(rc), r(rr), nc[None], nr[None], loss_type=c.loss,
                               beta=c.beta, label_smoothing=c.label_smoothing, gamma=c.gamma,
                               orpo_lambda=c.orpo_lambda, rpo_alpha=c.rpo_alpha)
  rc, rr = (None, None) if ref is None else (ref[:, 0], ref[:, 1])
  losses, metrics = jax.vmap(one)(logps[:, 0], logps[:, 1], rc, rr, n[:, 0], n[:, 1])  # [P]
  if ref is not None:  # mean over the chosen completion's tokens of log pi - log pi_ref
    metrics["kl"] = (logps[:, 0] - ref[:, 0]) / jnp.maximum(n[:, 0], 1.0)
  return _weighted(batch["weight"], losses, metrics)


# ----------------------------------------------------------------------------- checks


def _check_reward(config):
  c = config.reward
  if c.loss not in rm.REWARD_LOSS_KINDS:
    raise UserError(f"config.reward.loss={c.loss!r}: use one of {rm.REWARD_LOSS_KINDS}")
  if c.centering < 0:
    raise UserError(f"config.reward.centering={c.centering} must be >= 0")
  if config.lora.rank > 0:
    raise UserError("config.lora.rank > 0: LoRA reward models are not supported (the reward head "
                    "would have to be saved with the adapters); use full fine-tuning")
  _check_pairs(config)


def _check_dpo(config):
  c = config.dpo
  if c.loss not in dpo.LOSS_TYPES:
    raise UserError(f"config.dpo.loss={c.loss!r}: use one of {dpo.LOSS_TYPES}")
  if c.beta <= 0:
    raise UserError(f"config.dpo.beta={c.beta} must be positive")
  if c.label_smoothing and c.loss not in SMOOTHED:
    raise UserError(f"config.dpo.label_smoothing={c.label_smoothing} is not used by config.dpo.loss={c.loss!r}")
  if not 0 <= c.label_smoothing < 0.5:
    raise UserError(f"config.dpo.label_smoothing={c.label_smoothing} must be in [0, 0.5)")
  if c.rpo_alpha < 0 or (c.rpo_alpha and c.loss == "orpo"):
    raise UserError(f"config.dpo.rpo_alpha={c.rpo_alpha} must be >= 0, and 0 with orpo (it has the NLL term)")
  if needs_dpo_reference(config) and not config.init_from:
    raise UserError(f"config.dpo.loss={c.loss!r} needs a reference model: set config.init_from "
                    f"(the SFT run, which is also the starting point)")
  _check_pairs(config)


def _check_pairs(config):
  if config.data.source not in ("builtin",) + formats.FORMATS:
    raise UserError(f"config.data.source={config.data.source!r}: {config.objective} reads "
                    f"preference pairs from 'builtin' or one of {formats.FORMATS}")


def needs_dpo_reference(config) -> bool:
  return config.dpo.loss not in REFERENCE_FREE


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  loss: Callable  # (params, batch, model, ctx) -> (numerator, denominator, {metric: sum})
  packed: bool = True  # batches come from train/data.py's packed rows
  make_batches: Optional[Callable] = None  # (config, tok, split, pidx, pcount[, columns]) -> iter | list
  needs_reference: Callable = lambda config: False
  extra_params: Optional[Callable] = None  # (model_cfg, rng) -> {top-level name: params}
  check: Callable = lambda config: None  # raises ValueError naming the bad key
  unit: str = "tokens"  # what the denominator counts


OBJECTIVES = {
    "pretrain": Objective("pretrain", next_token_loss),
    "sft": Objective("sft", next_token_loss),
    "reward_model": Objective("reward_model", reward_loss, packed=False, make_batches=pairs.make_batches,
                              extra_params=heads.reward_head_params, check=_check_reward, unit="pairs"),
    "dpo": Objective("dpo", dpo_loss, packed=False, make_batches=pairs.make_batches,
                     needs_reference=needs_dpo_reference, check=_check_dpo, unit="pairs"),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    near = closest(name, OBJECTIVES)
    raise UserError(f"config.objective={name!r}: known objectives are {sorted(OBJECTIVES)}"
                    + (f" (did you mean {near!r}?)" if near else ""),
                    hint="the online ones (grpo, rloo, gspo, ppo) are rl/algorithms.py's")
  return OBJECTIVES[name]
