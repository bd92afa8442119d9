"""Every key of a stage config, with its default. Experiment configs start from `base_config()` and
change what they need; `train/validate.py` rejects any key that is not in here, naming it.
The sections' keys and defaults are in configs/sections.py."""
import ml_collections

from configs import models, sections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "pretrain"           # pretrain | sft | reward_model | dpo (train/objectives.py)
  c.model = models.tiny()
  c.steps = 1000
  c.batch_size = 16                  # global rows per step, over all hosts and devices
  c.seq_len = 128
  c.logits_chunk = 0                 # positions per piece of the LM head + loss (no [b, t, vocab]); 0 = one
  c.seed = 0
  c.init_from = ""                   # a run's workdir: start from its latest params
  c.log_every = 10
  c.max_nonfinite_steps = 5          # skipped (NaN / inf) updates in a row before the run stops; 0 = stop at the first
  c.eval_every = 100                 # 0 = only at the end
  c.eval_batches = 8                 # held-out batches per eval; 0 = the whole held-out split
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.peak_flops_per_device = 0.0      # for MFU; 0 = by device kind (CPU: a measured matmul rate)
  c.compiler_options = "overlap"     # XLA options of the step on TPU / GPU: overlap | default (train/compiler_options)
  c.profile = sections.profile()
  c.mesh = sections.mesh()
  c.optim = sections.optim()
  c.lora = sections.lora()
  c.reward = sections.reward()
  c.dpo = sections.dpo()
  c.data = sections.data()
  c.tokenizer = sections.tokenizer()
  return c


def rl_config() -> ml_collections.ConfigDict:
  """A stage config of the online RL loop (objective grpo | rloo | gspo | ppo): the base keys plus `config.rl`."""
  c = base_config()
  c.rl = sections.rl()
  return c
