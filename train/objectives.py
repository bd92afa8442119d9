"""Objectives: what a stage optimises. Each is a small record chosen by `config.objective`.

A loss returns (numerator, denominator, metric sums) rather than a mean, so gradient accumulation
and multi-batch evaluation stay exact: the step's loss is sum(numerators) / sum(denominators).
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
  """Per-token negative log-likelihood in fp32. logits [b, t, v], targets [b, t] -> [b, t]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target_logit


def next_token_loss(params, batch, model):
  """Masked next-token cross-entropy over a packed batch (pretraining and SFT).

  batch: inputs, targets, segment_ids, positions [b, t] int32; loss_mask [b, t] float32.
  """
  logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = token_nll(logits, batch["targets"])  # [b, t]
  total = jnp.sum(nll * mask)
  correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask)
  return total, jnp.sum(mask), {"accuracy": correct}


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  loss: Callable  # (params, batch, model) -> (numerator, denominator, {metric: sum})
  packed: bool = True  # batches come from train/data.py's packed rows


OBJECTIVES = {
    "pretrain": Objective("pretrain", next_token_loss),
    "sft": Objective("sft", next_token_loss),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}: known objectives are {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
