"""Extra heads on the decoder's final hidden state, kept as plain params next to the model's.

A head lives at the top level of the params tree (e.g. `params["reward_head"]`); the Transformer
ignores it, so `model.apply` works on the extended tree unchanged. Heads are small and replicated.
"""
import math

import jax
import jax.numpy as jnp


def init_scalar_head(d_model: int, rng) -> dict:
  """{"kernel": [d], "bias": []}: kernel ~ N(0, 1/d), so a unit-RMS hidden state gives O(1) scores."""
  kernel = jax.random.normal(rng, (d_model,), jnp.float32) / math.sqrt(d_model)
  return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def scalar_head(head: dict, hidden):
  """One score per hidden state in fp32. hidden [..., d] -> [...]."""
  return hidden.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"]


def reward_score(head: dict, last_hidden, token_logps=None, mask=None, logp_weight=0.0):
  """A reward model's score of each completion in fp32: the scalar head on the hidden state after its
  last token, plus (with token_logps) `logp_weight` x the mean log-prob of its tokens under the
  model's own LM head: SimPO's length-normalised implicit reward, which reads what the LM knows of
  each token where the last state alone must work it out again.
  last_hidden [..., d]; token_logps, mask [..., T] (1 = a completion token) -> [...]."""
  score = scalar_head(head, last_hidden)
  if token_logps is None:
    return score
  mask = mask.astype(jnp.float32)
  mean_logp = jnp.sum(token_logps * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
  return score + logp_weight * mean_logp


def reward_head_params(model_cfg, rng) -> dict:
  """The reward model's extra params: {"reward_head": scalar head}."""
  return {"reward_head": init_scalar_head(model_cfg.d_model, rng)}
