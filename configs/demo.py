"""The whole pipeline on the built-in arithmetic and word problems, on CPU, no download:

  python -m train.pipeline --config configs/demo.py --workdir runs/demo        # = make demo
  python -m train.pipeline --config configs/demo.py:small --workdir runs/demo_small   # a GPU

Stages run in `stages` order; each is a full stage config (override with
`--config.sft.steps=300`). Evaluation settings are under `eval`.
"""
import ml_collections

from configs import pretrain_tiny, sft_tiny


def get_config(arg=None):
  size = arg or "tiny"
  c = ml_collections.ConfigDict()
  c.stages = ["pretrain", "sft"]

  c.pretrain = pretrain_tiny.get_config(size)
  c.pretrain.steps = 600

  c.sft = sft_tiny.get_config(size)
  c.sft.init_from = "@pretrain"
  c.sft.steps = 500

  from eval.suite import default_eval_config
  c.eval = default_eval_config()
  return c
