"""Pretrain the tiny model on the built-in corpus (arithmetic, word problems, Python's own docs).

  python -m train --config configs/pretrain_tiny.py --workdir runs/pretrain_tiny
  python -m train --config configs/pretrain_tiny.py:small --workdir runs/pretrain_small

`arg` picks the model preset (default tiny). About a minute on two CPU cores.
"""
from configs import base, models


def get_config(arg=None):
  c = base.base_config()
  c.objective = "pretrain"
  c.model = models.get(arg or "tiny")
  c.steps = 600
  c.batch_size = 16
  c.seq_len = 128
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 100
  return c
