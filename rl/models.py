"""What an online RL run starts from: the policy's state (resumed, `init_from`, or LoRA over it),
the value model its algorithm may need, the frozen reference, and a reward model.

- The policy: train/state.py `setup`, as every stage; with rl.value_model=policy (and an
  algorithm that uses values) its params carry a "value_head".
- rl.value_model=critic: a separate transformer + "value_head" with its own optimizer state,
  checkpointed in `workdir/critic/checkpoints` at the same iterations as the policy.
- The reference (rl.beta > 0 or rl.kl_target > 0): the frozen LoRA base, else a frozen copy of
  `init_from`.
- rl.reward_model: a reward_model run's params (with its "reward_head", and the run's
  reward.logp_weight as reward_head["logp_weight"] when it is not 0) and model config.
"""
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from model import heads
from model.transformer import ModelConfig, Transformer
from rl import algorithms, config as rl_config, value
from train import checkpoints, rundir
from train import state as state_lib
from train.params import abstract_params


def load_reward_model(path: str, mesh):
  """(params with reward_head, its ModelConfig) of a reward_model run, or (None, None)."""
  if not path:
    return None, None
  config = rundir.load_config(path)
  cfg = ModelConfig.from_config(config.model)
  abstract, shardings, _, _ = abstract_params(Transformer(cfg), 8, mesh, heads.reward_head_params)
  params, _ = rundir.restore_params(path, abstract, shardings)
  weight = config.get("reward", {}).get("logp_weight", 0.0)
  if weight:  # the score's log-prob term (model/heads.py reward_score) travels with the head
    bias = params["reward_head"]["bias"]
    params["reward_head"] = {**params["reward_head"], "logp_weight": jax.device_put(
        jnp.float32(weight), bias.sharding)}
  return params, cfg


@dataclasses.dataclass
class Models:
  """Everything a run starts from: the trained state (policy, optional critic) and frozen models."""
  trainable: Any         # full params (with "value_head" for rl.value_model=policy) or LoRA adapters
  opt_state: Any
  frozen: Any            # the LoRA base (also the reference), else None
  start: int             # iteration to continue from
  meta: dict             # the policy checkpoint's meta (prompts, beta, rng), {} at the start
  critic: Any = None     # rl.value_model=critic: transformer + "value_head", and its optimizer state
  critic_opt: Any = None
  cmngr: Any = None
  ref: Any = None        # the reference's params under full fine-tuning (else frozen or None)
  rm: Any = None         # reward model params (with "reward_head") and its ModelConfig
  rm_cfg: Any = None
  notes: list = dataclasses.field(default_factory=list)  # for the start-up line


def setup_models(config, workdir, model, tx, mesh, mngr, critic_tx=None) -> Models:
  """Policy state from train/state.setup (resume, init_from, LoRA), then critic (optimizer `critic_tx`,
  default `tx`), reference, reward model."""
  r = config.rl
  where_values = algorithms.value_model(config)  # None, "policy" or "critic"
  head_on_policy = where_values == "policy"
  st = state_lib.setup(config, model, tx, mesh, mngr, value.value_head_params if head_on_policy else None)
  m = Models(st.trainable, st.opt_state, st.frozen, st.start, st.meta, notes=[st.source])
  if head_on_policy and m.start == 0:
    m.trainable, copied = value.head_from_reward_model(value.init_from(config), m.trainable)
    m.notes[-1] += f"; value_head = the reward head of {value.init_from(config)}" if copied else ""
  if where_values == "critic":
    m.cmngr = rundir.manager(os.path.join(workdir, "critic"), config.keep_checkpoints,
                                 config.async_checkpoints)
    # The policy's newest steps were bad (moved aside by its resume): the critic resumes with it.
    checkpoints.set_aside(m.cmngr, {s: "after-policy" for s in m.cmngr.all_steps() if s > m.start})
    cst = state_lib.setup(value.critic_config(config), model, critic_tx or tx, mesh, m.cmngr, value.value_head_params)
    if cst.start != m.start:
      raise ValueError(f"{workdir}: the critic's checkpoint is at iteration {cst.start} but the policy's "
                       f"at {m.start}; delete the later one to resume from the earlier")
    m.critic, m.critic_opt = cst.trainable, cst.opt_state
    m.notes.append(f"critic {cst.source}")
    if m.start == 0:
      m.critic, copied = value.head_from_reward_model(value.init_from(config), m.critic)
      m.notes[-1] += "; value_head = its reward head" if copied else ""
  if rl_config.needs_reference(config):
    if m.frozen is None:
      abs_params, param_sh, _, _ = abstract_params(model, config.seq_len, mesh)
      m.ref, _ = rundir.restore_params(config.init_from, abs_params, param_sh)
    m.notes.append("reference: the frozen LoRA base" if m.frozen is not None else
                   f"reference: frozen copy of {config.init_from}")
  m.rm, m.rm_cfg = load_reward_model(r.reward_model, mesh)
  if m.rm is not None:
    m.notes.append(f"reward model {r.reward_model}")
  return m
