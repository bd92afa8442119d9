"""Pretrain Llama-3 70B on a TPU v5p-512 pod slice (256 chips).

Run the same command on every host (multi-host setup is detected, see README):

  python -m train --config configs/pretrain_llama3_70b.py --workdir gs://BUCKET/llama3_70b \
      --config.data.tfds_name=c4/en --config.tokenizer.path=/path/to/tokenizer.model

Check that it compiles and fits first, on any machine with the `tpu` extra installed:

  python -m train.aot --config configs/pretrain_llama3_70b.py --topology v5p-512 --out aot_70b.json

Mesh: data 2 x fsdp 128 (parameters and Adam state split 128 ways: ~6.6 GB of the 840 GB per chip;
over all 256 chips XLA:TPU compiles the parameter gathers as all-reduces, over half of them as
asynchronous all-gathers, docs/performance.md), two rows of 8192 tokens per chip (global batch
512 x 8192 = 4M tokens/step: the per-step FSDP collectives over twice the work), bf16 compute,
splash attention (model.attention=auto on a TPU), scanned layers rematerialised with their inputs
in host memory (model.remat=offload), the LM head and loss 1024 positions at a time: peak 23.0
GiB of 95 per chip, + 20 GiB of host memory.
`arg` may give the device count to plan for (default 256).
"""
from configs import base, models

PLANNED_DEVICES = 256  # tests validate the mesh and batch against this many devices


def get_config(arg=None):
  devices = int(arg or PLANNED_DEVICES)
  c = base.base_config()
  c.objective = "pretrain"
  c.model = models.llama3_70b()
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = "offload"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, -1, 1
  c.steps = 500_000
  c.batch_size = 2 * devices        # 512 on 256 chips: divisible by data * fsdp
  c.seq_len = 8192
  c.logits_chunk = 1024
  c.optim.lr = 1.5e-4
  c.optim.warmup_steps = 2000
  c.optim.end_lr_frac = 0.1
  c.optim.weight_decay = 0.1
  c.log_every = 10
  c.eval_every = 2000
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.data.source = "tfds"
  c.data.tfds_name = "c4/en"
  c.data.tfds_eval_split = "validation"
  c.data.pipeline = "stream"        # no pass over c4 before step 1: each host streams its shard
  return c
