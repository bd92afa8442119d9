"""Every config file loads, validates for the device count it plans for, and its model
initialises abstractly (jax.eval_shape: no memory allocated, so 8B shapes are fine)."""
import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest

from configs import base, sections
from model.transformer import ModelConfig, Transformer
from rl import config as rl_config, rewards
from train.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if os.path.basename(f) not in ("__init__.py", "models.py", "base.py", "sections.py", "tools.py",
                                             "errors.py"))


def launch_args(path):
  """[None] + every `configs/NAME.py:ARG` the file names in its launch commands (demo.py:small)."""
  with open(path) as f:
    text = f.read()
  name = re.escape(os.path.basename(path))
  return [None] + sorted(set(re.findall(rf"configs/{name}:([\w,.]+)", text)))


CASES = [(f, arg) for f in FILES for arg in launch_args(f)]


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  names = {os.path.basename(f) for f in FILES}
  assert {"pretrain_tiny.py", "pretrain_llama3_8b.py"} <= names


@pytest.mark.parametrize("path,arg", CASES,
                         ids=[os.path.basename(f) + (f":{a}" if a else "") for f, a in CASES])
def test_config_validates_and_initialises_abstractly(path, arg):
  module = load(path)
  assert "python -m" in (module.__doc__ or ""), "the launch command belongs in the docstring"
  config = module.get_config(arg)
  devices = getattr(module, "PLANNED_DEVICES", 8)
  # a pipeline config (configs/demo.py) is a list of stage configs: check each one
  stages = [config[s] for s in config.stages] if "stages" in config else [config]
  for stage in stages:
    if stage.objective in ("grpo", "ppo"):
      from rl.loop import check_config
      stage.init_from = stage.init_from or "runs/sft_tiny"  # given on the command line
      check_config(stage, devices, max(1, devices // 8))
    else:
      validate(stage, num_devices=devices, num_processes=max(1, devices // 8))
    cfg = ModelConfig.from_config(stage.model)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert n == cfg.num_params()


def test_every_section_comes_from_configs_sections():
  c = base.rl_config()
  for name in ("profile", "mesh", "optim", "lora", "reward", "dpo", "data", "tokenizer", "rl"):
    assert c[name].to_dict() == getattr(sections, name)().to_dict(), name
  assert set(sections.pipeline().eval) >= set(sections.eval()) | {"reference", "reward_model"}


def test_reward_weights_name_every_registered_reward_function():
  assert tuple(rewards.REWARD_FUNCTIONS) == sections.REWARD_NAMES


@pytest.mark.parametrize("key", ["optim.lr_typo", "data.sauce", "stepz"])
def test_unknown_key_fails_naming_it(key):
  c = base.base_config()
  section, _, last = key.rpartition(".")
  (c[section] if section else c)[last] = 1
  with pytest.raises(ValueError, match=f"config.{key}"):
    validate(c, num_devices=8)


def test_unknown_rl_key_fails_naming_it():
  c = base.rl_config()
  c.objective, c.init_from = "grpo", "runs/sft_tiny"
  c.rl.rewards.answer_match = 1.0
  c.rl.num_generationz = 4
  with pytest.raises(ValueError, match="config.rl.num_generationz"):
    rl_config.check(c)
