"""Reward model on the built-in preference pairs (correct answer vs wrong number / missing
<answer> tag), from the tiny SFT run: a scalar head on the last token's final hidden state (with
`reward.logp_weight`, plus that times the mean token log-prob: configs/demo.py uses 4).

  python -m train --config configs/pretrain_tiny.py --workdir runs/pretrain_tiny
  python -m train --config configs/sft_tiny.py --workdir runs/sft_tiny --config.init_from=runs/pretrain_tiny
  python -m train --config configs/reward_tiny.py --workdir runs/reward_tiny --config.init_from=runs/sft_tiny \
      [--config.reward.loss=margin_ranking --config.reward.margin=1.0] [--config.reward.logp_weight=4]
  python -m eval.preference --workdir runs/reward_tiny [--config.data=pairs.jsonl]

`arg` picks the model preset (default tiny); it must match the SFT run's.
"""
from configs import base, models


def get_config(arg=None):
  c = base.base_config()
  c.objective = "reward_model"
  c.model = models.get(arg or "tiny")
  c.init_from = ""                 # the SFT run; the reward head starts at random
  c.steps = 300
  c.batch_size = 16                # pairs per step
  c.seq_len = 128                  # prompt + completion, padded
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.0
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 0               # all held-out pairs
  c.checkpoint_every = 100
  c.data.source = "builtin"
  c.data.num_documents = 20000     # pairs (one per problem); held out: num_documents // 50 = 400
  c.reward.loss = "bradley_terry"
  return c
