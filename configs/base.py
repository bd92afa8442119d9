"""Every config key, with its default. Experiment configs start from `base_config()` and change
what they need; `train/validate.py` rejects any key that is not in here, naming it."""
import ml_collections

from configs import models
from model.lora import DEFAULT_TARGETS


def base_config() -> ml_collections.ConfigDict:
  from train import data  # the data section is defined next to the code that reads it

  c = ml_collections.ConfigDict()
  c.objective = "pretrain"           # pretrain | sft | reward_model | dpo (train/objectives.py)
  c.model = models.tiny()
  c.steps = 1000
  c.batch_size = 16                  # global rows per step, over all hosts and devices
  c.seq_len = 128
  c.seed = 0
  c.init_from = ""                   # a run's workdir: start from its latest params
  c.log_every = 10
  c.eval_every = 100                 # 0 = only at the end
  c.eval_batches = 8                 # held-out batches per eval; 0 = the whole held-out split
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.peak_flops_per_device = 0.0      # for MFU; 0 = by device kind (CPU: a measured matmul rate)
  c.profile = ml_collections.ConfigDict(dict(  # a jax.profiler trace of a few steps (train/profile.py)
      start_step=0,                    # first step recorded, as logged (step 1 compiles); 0 = off
      num_steps=3,
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-3, warmup_steps=100, schedule="cosine", end_lr_frac=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum=1))
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,                          # 0 = full fine-tuning; > 0 = train adapters only
      alpha=16.0,                      # adapter scale is alpha / rank
      targets=list(DEFAULT_TARGETS),   # regexes over parameter paths
  ))
  c.reward = ml_collections.ConfigDict(dict(  # objective reward_model (docs/algorithms.md)
      loss="bradley_terry",            # bradley_terry | margin_ranking
      margin=0.0,                      # r_w - r_l target margin
      centering=0.0,                   # + centering * mean((r_w + r_l)^2)
  ))
  c.dpo = ml_collections.ConfigDict(dict(  # objective dpo (docs/algorithms.md)
      loss="sigmoid",                  # sigmoid | cdpo | robust | ipo | simpo | orpo
      beta=0.1,
      label_smoothing=0.0,             # eps of sigmoid / cdpo / robust
      gamma=0.5,                       # simpo target margin
      orpo_lambda=0.1,                 # orpo weight of the odds-ratio term
      rpo_alpha=0.0,                   # + rpo_alpha * average NLL of the chosen answer (RPO)
      precompute_reference=False,      # reference log-probs once before training (cached in workdir)
  ))
  c.data = data.default_data_config()
  c.tokenizer = data.default_tokenizer_config()
  return c
