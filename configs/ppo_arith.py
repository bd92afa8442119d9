"""PPO on the built-in arithmetic and word problems, from the tiny SFT run (also the reference):
verifiable reward (1 for the right final number) on the last token, per-token KL penalty in the
reward, a separate critic started from the SFT run, GAE, 4 epochs per rollout.

  python -m train --config configs/ppo_arith.py --workdir runs/ppo_arith --config.init_from=runs/sft_tiny
  python -m train --config configs/ppo_arith.py --workdir runs/ppo_rm --config.init_from=runs/sft_tiny \
      --config.rl.reward_model=runs/reward_tiny --config.rl.rewards.answer_match=0
  python -m train --config configs/ppo_arith.py --workdir runs/ppo_shared --config.init_from=runs/sft_tiny \
      --config.rl.value_model=policy          # value head on the policy's trunk: no second model

With a reward model the critic starts from it (its trunk and reward head), as in TRL.
`config.steps` counts iterations; `config.batch_size` counts completions per iteration.
`arg` picks the model preset (default tiny); it must match the SFT run's.
"""
from configs import base, models


def get_config(arg=None):
  c = base.rl_config()
  c.objective = "ppo"
  c.model = models.get(arg or "tiny")
  c.init_from = ""                 # the SFT run: start point, reference and critic
  c.steps = 60                     # iterations
  c.batch_size = 128               # completions per iteration (one per prompt)
  c.seq_len = 128
  c.optim.lr = 2e-5                # tiny, 400 held-out problems: +4.3 points (0.16 -> 0.21); 1e-4 +3.0
  c.optim.b2 = 0.99
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.log_every = 1
  c.eval_every = 30
  c.checkpoint_every = 10
  c.data.source = "builtin"
  c.rl.num_generations = 1
  c.rl.max_prompt_len = 64
  c.rl.max_new_tokens = 80         # the longest built-in solution is 74 tokens
  c.rl.temperature = 1.0
  c.rl.rewards.answer_match = 1.0
  c.rl.missing_eos_penalty = 1.0
  c.rl.beta = 0.05                 # per-token KL in the reward (TRL's kl_coef)
  c.rl.kl_estimator = "k1"
  c.rl.num_iterations = 4          # PPO epochs per rollout
  c.rl.num_minibatches = 2
  c.rl.value_model = "critic"
  c.rl.vf_coef = 0.1
  c.rl.gamma = 1.0
  c.rl.lam = 0.95
  c.rl.num_eval_problems = 400      # held-out problems per eval (greedy); 200 gives +-2.6% noise
  return c
