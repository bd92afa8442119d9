"""DPO on the built-in preference pairs (correct answer vs wrong number / missing <answer> tag),
from the tiny SFT run, which is also the reference model.

  python -m train --config configs/dpo_tiny.py --workdir runs/dpo_tiny --config.init_from=runs/sft_tiny
  python -m train --config configs/dpo_tiny.py --workdir runs/ipo_tiny --config.init_from=runs/sft_tiny \
      --config.dpo.loss=ipo --config.dpo.beta=1.0
  python -m train --config configs/dpo_tiny.py --workdir runs/dpo_lora --config.init_from=runs/sft_tiny \
      --config.lora.rank=8 --config.optim.lr=1e-3
  python -m eval.preference --workdir runs/dpo_tiny      # implicit-reward accuracy on held-out pairs

dpo.loss: sigmoid | cdpo | robust | ipo | simpo | orpo (simpo / orpo need no reference). IPO aims at
a per-token log-ratio margin of 1/(2 beta): beta 0.1 asks for 5 nats and drags the chosen log-probs
down with the rejected ones (tiny: chosen -4 -> -77); beta 1.0 keeps them (-4 -> -4.7), same accuracy.
With --config.dpo.precompute_reference=True the reference log-probs are computed once and cached.
`arg` picks the model preset (default tiny); it must match the SFT run's.
"""
from configs import base, models


def get_config(arg=None):
  c = base.base_config()
  c.objective = "dpo"
  c.model = models.get(arg or "tiny")
  c.init_from = ""                 # the SFT run: start point and reference
  c.steps = 150
  c.batch_size = 16                # pairs per step
  c.seq_len = 128                  # prompt + completion, padded
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 15
  c.optim.weight_decay = 0.0
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 0               # all held-out pairs
  c.checkpoint_every = 50
  c.data.source = "builtin"
  c.data.num_documents = 20000     # pairs (one per problem); held out: num_documents // 50 = 400
  c.dpo.loss = "sigmoid"
  c.dpo.beta = 0.1
  return c
