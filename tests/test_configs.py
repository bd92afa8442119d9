"""Every config file loads, validates for the device count it plans for, and its model
initialises abstractly (jax.eval_shape: no memory allocated, so 8B shapes are fine)."""
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from model.transformer import ModelConfig, Transformer
from train.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if os.path.basename(f) not in ("__init__.py", "models.py", "base.py", "sections.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  names = {os.path.basename(f) for f in FILES}
  assert {"pretrain_tiny.py", "pretrain_llama3_8b.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_validates_and_initialises_abstractly(path):
  module = load(path)
  assert "python -m" in (module.__doc__ or ""), "the launch command belongs in the docstring"
  config = module.get_config()
  devices = getattr(module, "PLANNED_DEVICES", 8)
  # a pipeline config (configs/demo.py) is a list of stage configs: check each one
  stages = [config[s] for s in config.stages] if "stages" in config else [config]
  for stage in stages:
    if stage.objective in ("grpo", "ppo"):
      from rl.loop import check_config
      stage.init_from = stage.init_from or "runs/sft_tiny"  # given on the command line
      check_config(stage)
    else:
      validate(stage, num_devices=devices, num_processes=max(1, devices // 8))
    cfg = ModelConfig.from_config(stage.model)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert n == cfg.num_params()
