"""Pretrain Llama-3 8B on a TPU v5p-256 pod slice (128 chips) or 16 x 8-GPU H100 hosts.

Run the same command on every host (multi-host setup is detected, see README):

  python -m train --config configs/pretrain_llama3_8b.py --workdir gs://BUCKET/llama3_8b \
      --config.data.tfds_name=c4/en --config.tokenizer.path=/path/to/tokenizer.model

Check that it compiles and fits first, on any machine with the `tpu` extra installed:

  python -m train.aot --config configs/pretrain_llama3_8b.py --topology v5p-256 --out aot_8b.json

Mesh: data 2 x fsdp 64 x tensor 1: params and Adam state split 64 ways (1.4 GiB per chip), each
half of the slice a replica. Over all 128 chips of a v5p-256 (4x4x8, a full 3D torus) XLA:TPU
compiles every all-gather as an all-reduce of the zero-padded shards (twice the bytes, never
asynchronous); over 64 they are all-gathers, overlapped with the layers' compute (docs/performance.md).
Global batch 512 x 8192 tokens = 4M tokens/step, bf16 compute, scanned layers rematerialised with
their inputs offloaded to host memory (model.remat=offload).
`arg` may give the device count to plan for (default 128).
"""
from configs import base, models

PLANNED_DEVICES = 128  # tests validate the mesh and batch against this many devices


def get_config(arg=None):
  devices = int(arg or PLANNED_DEVICES)
  c = base.base_config()
  c.objective = "pretrain"
  c.model = models.llama3_8b()
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = "offload"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, -1, 1
  c.steps = 250_000
  c.batch_size = 4 * devices        # 512 on 128 devices: divisible by data * fsdp
  c.seq_len = 8192
  c.logits_chunk = 1024             # no [rows, 8192, 128256] fp32 logits: 1024 positions at a time
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.end_lr_frac = 0.1
  c.optim.weight_decay = 0.1
  c.log_every = 10
  c.eval_every = 2000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.data.source = "tfds"
  c.data.tfds_name = "c4/en"
  c.data.tfds_eval_split = "validation"
  c.data.pipeline = "stream"        # no pass over c4 before step 1: each host streams its shard
  return c
