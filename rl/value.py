"""PPO's value model: a scalar head (model/heads.py) on a transformer's final hidden state.

- rl.value_model "policy": `params["value_head"]` on the policy's own trunk (one forward serves
  log-probs and values; full fine-tuning only).
- rl.value_model "critic": a separate transformer + `value_head`, with its own optimizer state,
  checkpointed in `workdir/critic/checkpoints`.

Either starts from `rl.value_init_from` (default: the reward model if there is one, else
`init_from`): its trunk for the critic, and its `reward_head` as the value head when it has one.
Otherwise the head starts at zero, so the first values are 0 and the first advantages are the
(whitened) returns themselves.
"""
import copy

import jax
import jax.numpy as jnp

from model import heads
from train import optim, rundir


def value_head_params(model_cfg, rng) -> dict:
  """{"value_head": a zero scalar head}: V = 0 until it trains."""
  del rng
  return {"value_head": {"kernel": jnp.zeros((model_cfg.d_model,), jnp.float32),
                         "bias": jnp.zeros((), jnp.float32)}}


def values(params, hidden):
  """V(s_t) [R, T] from the final hidden states [R, T, d]."""
  return heads.scalar_head(params["value_head"], hidden)


def init_from(config) -> str:
  return config.rl.value_init_from or config.rl.reward_model or config.init_from


def critic_optimizer(config, steps: int):
  """(optax transformation, schedule) of a separate critic: config.optim's, peaking at rl.critic_lr
  (0 = optim.lr). With Adam, rl.vf_coef barely scales a separate critic's steps; its lr does."""
  optim_cfg = copy.deepcopy(config.optim)
  with optim_cfg.unlocked():
    optim_cfg.lr = config.rl.critic_lr or config.optim.lr
  return optim.make_optimizer(optim_cfg, steps)


def critic_config(config):
  """The config `train/state.setup` builds the critic from: full fine-tuning of `init_from(config)`."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.lora.rank = 0
    c.init_from = init_from(config)
  return c


def head_from_reward_model(path: str, params: dict):
  """(`params` with its value_head replaced by the `reward_head` stored in run `path`, whether it was)."""
  if not path or path.startswith(rundir.HF_PREFIX):  # a HF checkpoint has no reward head
    return params, False
  directory = rundir.checkpoint_dir(path)
  step = rundir.latest_step(path)
  if step is None or "reward_head" not in rundir.stored_keys(directory, step):
    return params, False
  head = params["value_head"]
  abstract = {"reward_head": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), head)}
  shardings = {"reward_head": jax.tree.map(lambda x: x.sharding, head)}
  restored, _ = rundir.restore_params(path, abstract, shardings)
  return {**params, "value_head": restored["reward_head"]}, True
