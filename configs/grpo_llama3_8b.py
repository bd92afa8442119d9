"""GRPO on Llama-3 8B (from an SFT run) on a TPU v5p-64 slice (32 chips): the policy, its frozen
reference and the rollout share one mesh (fsdp over all 32 chips).

Run the same command on every host (multi-host setup is detected, see README):

  python -m train --config configs/grpo_llama3_8b.py --workdir /mnt/shared/grpo_8b \
      --config.init_from=/mnt/shared/sft_8b --config.rl.prompts=jsonl --config.rl.prompts_path=prompts.jsonl

Check that its update step, the rollout's prefill and a decode step compile and fit first, on any
machine with the `tpu` extra installed (no checkpoint read):

  python -m train.aot --config configs/grpo_llama3_8b.py --topology v5p-64 --out aot_grpo_8b.json

Per iteration 64 prompts x 8 completions of up to 1024 tokens after up to 512 prompt tokens, then
4 minibatch updates of 128 completions: bf16 compute, scanned + rematerialised layers, the LM
head and log-probs 256 positions at a time (config.logits_chunk). `arg` may give the device count
to plan for (default 32).
"""
from configs import base, models

PLANNED_DEVICES = 32  # tests validate the mesh and batch against this many devices


def get_config(arg=None):
  devices = int(arg or PLANNED_DEVICES)
  c = base.rl_config()
  c.objective = "grpo"
  c.model = models.llama3_8b()
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = "full"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.init_from = ""                  # the SFT run: start point and KL reference
  c.steps = 1000                    # iterations
  c.batch_size = 16 * devices       # completions per iteration: 512 = 64 prompts x 8 on 32 chips
  c.seq_len = 1536                  # max_prompt_len + max_new_tokens
  c.logits_chunk = 256              # no [rows, 1024, 128256] fp32 logits: 256 positions at a time
  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.log_every = 1
  c.eval_every = 50
  c.checkpoint_every = 25
  c.keep_checkpoints = 3
  c.rl.num_generations = 8
  c.rl.num_minibatches = 4          # 128 completions per update: 4 per chip
  c.rl.max_prompt_len = 512
  c.rl.max_new_tokens = 1024
  c.rl.temperature = 1.0
  c.rl.rewards.answer_match = 1.0
  c.rl.beta = 0.04
  c.rl.num_eval_problems = 200
  return c
