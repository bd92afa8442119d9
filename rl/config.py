"""Checks and derived values of `config.rl`, the online RL stages (objective grpo | rloo | gspo | ppo); its keys
and defaults are `configs/sections.py` `rl()`.

Units: `config.steps` counts iterations (one rollout, then `num_iterations` passes of
`num_minibatches` optimizer updates over it); `config.batch_size` counts completions per
iteration (prompts per iteration = batch_size // num_generations), as TRL counts them.
log_every / eval_every / checkpoint_every count iterations too.
"""
import math

import ml_collections

from configs import sections
from configs.errors import UserError
from rl import algorithms, grpo, kl
from rl.rewards import REWARD_FUNCTIONS
from train import formats
from train.validate import check_ranges, unknown_keys

PLACEMENTS = ("in_loss", "in_reward")
VALUE_MODELS = ("critic", "policy")
# The interval of every numeric key of config.rl (train/validate.py `check_ranges`).
RANGES = {
    "num_eval_problems": "[0, inf)", "max_prompt_len": "[2, inf)", "max_new_tokens": "[1, inf)",
    "oversample": "[1, inf)", "temperature": "(0, inf)", "top_k": "[0, inf)", "top_p": "(0, 1]",
    "missing_eos_penalty": "[0, inf)",
    "beta": "[0, inf)", "kl_target": "[0, inf)", "kl_horizon": "[1, inf)", "num_iterations": "[1, inf)",
    "eps_low": "(0, 1)", "eps_high": "(0, inf)", "gamma": "[0, 1]", "lam": "[0, 1]", "value_clip": "(0, inf)",
    "critic_lr": "[0, inf)", "vf_coef": "[0, inf)", "ent_coef": "[0, inf)", "num_samples_to_log": "[0, inf)",
}


def reward_weights(config) -> dict:
  """{reward function: weight} of the functions that are on (weight != 0)."""
  return {k: float(v) for k, v in config.rl.rewards.items() if v}


def needs_reference(config) -> bool:
  return config.rl.beta > 0 or config.rl.kl_target > 0


def num_prompts(config) -> int:
  return config.batch_size // config.rl.num_generations


def sampled_prompts(config) -> int:
  """Prompts sampled per iteration: num_prompts, or more with rl.oversample (GRPO family)."""
  return math.ceil(num_prompts(config) * config.rl.oversample - 1e-9)


def schema() -> ml_collections.ConfigDict:
  """`config.rl`'s keys: configs/sections.py's, with a weight for every registered reward function."""
  rl = sections.rl()
  rl.rewards = ml_collections.ConfigDict({name: 0.0 for name in REWARD_FUNCTIONS})
  return rl


def _one_of(r, key, options):
  if r[key] not in options:
    raise UserError(f"config.rl.{key}={r[key]!r}: use one of {' | '.join(options)}")


def check_start(config) -> None:
  """What only a launch needs (configs may leave init_from to the command line)."""
  if needs_reference(config) and not config.init_from:
    raise UserError(f"config.rl.beta={config.rl.beta}: the KL reference is config.init_from (the SFT "
                    "run); set it, or set config.rl.beta=0")


def check(config, data_ways: int = 1) -> None:
  """Raises UserError naming the first bad key of an RL config."""
  algorithm = algorithms.get(config.objective)  # raises naming the online algorithms
  if "rl" not in config:
    raise UserError("config.rl is missing: start the config from `configs.base.rl_config()`")
  r = config.rl
  if config.mesh.get("sequence", 1) > 1:
    raise UserError(f"config.mesh.sequence={config.mesh.sequence}: rows split over devices (context "
                    f"parallelism) serve the offline stages; RL stages decode", hint="set config.mesh.sequence=1")
  unknown_keys(r, schema(), "config.rl")
  check_ranges(r, RANGES, "config.rl")
  _one_of(r, "prompts", ("builtin",) + formats.FORMATS)
  _one_of(r, "kl_estimator", kl.KL_KINDS)
  _one_of(r, "kl_placement", ("",) + PLACEMENTS)
  _one_of(r, "scale", ("",) + grpo.SCALES)
  _one_of(r, "estimator", grpo.ESTIMATORS)
  _one_of(r, "ratio_level", ("token", "sequence"))
  _one_of(r, "loss_agg", grpo.AGG_MODES)
  _one_of(r, "value_model", VALUE_MODELS)
  if r.prompts != "builtin" and not r.prompts_path:
    raise UserError(f"config.rl.prompts={r.prompts!r} needs config.rl.prompts_path")
  g = r.num_generations
  if g < algorithm.min_generations:
    raise UserError(f"config.rl.num_generations={g}: {algorithm.name} needs >= "
                    f"{algorithm.min_generations} completions per prompt")
  if config.batch_size % g:
    raise UserError(f"config.batch_size={config.batch_size} (completions per iteration) is not "
                    f"divisible by config.rl.num_generations={g}")
  prompts = config.batch_size // g
  if r.num_minibatches < 1 or prompts % r.num_minibatches:
    raise UserError(f"config.rl.num_minibatches={r.num_minibatches} must divide the "
                    f"{prompts} prompts per iteration (a minibatch holds whole groups)")
  if (config.batch_size // r.num_minibatches) % data_ways:
    raise UserError(f"config.rl.num_minibatches={r.num_minibatches}: a minibatch of "
                    f"{config.batch_size // r.num_minibatches} completions is not divisible by "
                    f"the data axes ({data_ways})")
  sampled = sampled_prompts(config) * g
  if sampled % data_ways:
    raise UserError(f"config.rl.oversample={r.oversample}: {sampled} sampled completions per iteration are "
                    f"not divisible by the data axes ({data_ways})")
  if r.oversample > 1 and (g < 2 or r.reward_model):
    raise UserError(f"config.rl.oversample={r.oversample} picks the groups whose rule-based rewards "
                    f"differ: it needs config.rl.num_generations >= 2 (got {g}) and no "
                    f"config.rl.reward_model (got {r.reward_model!r})", hint="set config.rl.oversample=1")
  if config.optim.grad_accum != 1:
    raise UserError("config.optim.grad_accum must be 1 in RL stages: use config.rl.num_minibatches")
  if r.kl_target > 0 and r.beta <= 0:
    raise UserError("config.rl.kl_target > 0 (adaptive KL) needs an initial config.rl.beta > 0")
  if not reward_weights(config) and not r.reward_model:
    raise UserError("config.rl.rewards: every weight is 0 and config.rl.reward_model is '': "
                    "nothing scores the completions")
  if algorithms.value_model(config) == "policy" and config.lora.rank > 0:
    raise UserError("config.rl.value_model='policy' puts a value head on the policy's trunk, which "
                    "LoRA freezes: use config.rl.value_model='critic' with config.lora.rank > 0")
