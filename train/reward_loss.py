"""Reward-model pieces: pairwise losses, ranking -> pairs, last-real-token pooling.

docs/algorithms.md, "Reward model". The reward is a scalar head on the hidden state of the last
non-pad token of (prompt + response), plus `reward.logp_weight` x the response's mean token log-prob
(model/heads.py reward_score); rows may be left- or right-padded.

    bradley_terry  : L = -mean log s(r_w - r_l - margin)
    margin_ranking : L = mean max(0, margin - (r_w - r_l))
    centering      : + c * mean((r_w + r_l)^2)     (keeps rewards near zero)
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

REWARD_LOSS_KINDS = ("bradley_terry", "margin_ranking")


def reward_loss(r_chosen, r_rejected, *, kind="bradley_terry", margin=0.0, centering=0.0):
  """Pairwise reward-model loss. r_chosen, r_rejected: [B]; margin: scalar or [B].

  Returns (loss scalar, metrics: accuracy = mean(r_w > r_l), chosen/rejected means,
  margin = mean(r_w - r_l)).
  """
  r_w = jnp.asarray(r_chosen, jnp.float32)  # [B]
  r_l = jnp.asarray(r_rejected, jnp.float32)  # [B]
  diff = r_w - r_l  # [B]
  if kind == "bradley_terry":
    loss = -jnp.mean(jax.nn.log_sigmoid(diff - margin))
  elif kind == "margin_ranking":
    loss = jnp.mean(jnp.maximum(0.0, margin - diff))
  else:
    raise ValueError(f"unknown reward loss kind {kind!r}; expected one of {REWARD_LOSS_KINDS}")
  if centering:
    loss = loss + centering * jnp.mean(jnp.square(r_w + r_l))
  metrics = {
      "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
      "chosen": jnp.mean(r_w),
      "rejected": jnp.mean(r_l),
      "margin": jnp.mean(diff),
  }
  return loss, metrics


def ranking_to_pairs(responses):
  """A ranking (best first) of k responses -> the k(k-1)/2 (winner, loser) pairs.

  Pairs come in order: (1st, 2nd), (1st, 3rd), ..., (2nd, 3rd), ...
  """
  return list(itertools.combinations(list(responses), 2))


def last_token_index(mask):
  """Index of the last mask == 1 position of each row. mask [B, T] -> [B] int32.

  Works for left padding, right padding or both; an all-zero row gives 0.
  """
  positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)  # [T]
  return jnp.maximum(jnp.max(jnp.where(mask > 0, positions, -1), axis=-1), 0)


def gather_last(hidden, mask):
  """Hidden state of the last real token of each row. hidden [B, T, D], mask [B, T] -> [B, D]."""
  idx = last_token_index(mask)  # [B]
  return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
