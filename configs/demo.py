"""The whole pipeline on the built-in arithmetic and word problems, on CPU, no download:

  python -m train.pipeline --config configs/demo.py --workdir runs/demo        # = make demo
  python -m train.pipeline --config configs/demo.py:small --workdir runs/demo_small   # a GPU
  python -m train.pipeline --config configs/demo.py --workdir runs/demo --config.sft.steps=800

pretrain -> sft -> reward (reward model, from sft) -> dpo (from sft) -> grpo (from dpo,
verifiable answer reward) -> ppo (from sft, critic from sft), then every stage evaluated against
the SFT model with the reward model as the judge. Stages run in `stages` order; each is a full
stage config (override with `--config.sft.steps=300`); "@name" is the workdir of stage `name`.
`arg` picks the model preset (default demo: 1M params, ~15 min on two CPU cores).
"""
import ml_collections

from configs import dpo_tiny, grpo_arith, ppo_arith, pretrain_tiny, reward_tiny, sft_tiny


def get_config(arg=None):
  size = arg or "demo"
  c = ml_collections.ConfigDict()
  c.stages = ["pretrain", "sft", "reward", "dpo", "grpo", "ppo"]

  c.pretrain = pretrain_tiny.get_config(size)
  c.pretrain.steps = 300

  c.sft = sft_tiny.get_config(size)
  c.sft.init_from = "@pretrain"
  c.sft.steps = 500

  c.reward = reward_tiny.get_config(size)
  c.reward.init_from = "@sft"
  c.reward.steps = 150
  c.reward.optim.lr = 3e-4
  c.reward.eval_every = 0

  c.dpo = dpo_tiny.get_config(size)
  c.dpo.init_from = "@sft"
  c.dpo.steps = 100
  c.dpo.eval_every = 0
  c.dpo.dpo.precompute_reference = True   # one reference pass over the pairs, none per step

  c.grpo = grpo_arith.get_config(size)
  c.grpo.init_from = "@dpo"
  c.grpo.steps = 20
  c.grpo.eval_every = 10
  c.grpo.rl.num_eval_problems = 200

  c.ppo = ppo_arith.get_config(size)
  c.ppo.init_from = "@sft"
  c.ppo.steps = 20
  c.ppo.eval_every = 10
  c.ppo.rl.num_eval_problems = 200

  for name in c.stages:
    c[name].checkpoint_every = min(c[name].checkpoint_every, c[name].steps)

  from eval.suite import default_eval_config
  c.eval = default_eval_config()
  c.eval.reference = "sft"          # KL and win rate are measured against this stage
  c.eval.reward_model = "reward"    # ... with this reward model as the judge
  return c
