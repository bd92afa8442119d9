"""Supervised fine-tuning on the built-in conversations (arithmetic and word problems answered
step by step, then `<answer>N</answer>`), loss on assistant tokens only.

  python -m train --config configs/pretrain_tiny.py --workdir runs/pretrain_tiny
  python -m train --config configs/sft_tiny.py --workdir runs/sft_tiny \
      --config.init_from=runs/pretrain_tiny

`arg` picks the model preset (default tiny); it must match the pretraining run's.
"""
from configs import base, models


def get_config(arg=None):
  c = base.base_config()
  c.objective = "sft"
  c.model = models.get(arg or "tiny")
  c.init_from = ""
  c.steps = 400
  c.batch_size = 16
  c.seq_len = 128
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 100
  c.data.source = "builtin"
  c.data.train_on_prompt = False
  return c
