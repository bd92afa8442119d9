"""Config checks run at start: each failure names the key and what is wrong with it (a UserError)."""
import math

import ml_collections

from configs import base
from configs.errors import UserError, unknown
from model import quant, sharding, splash, tokenizer
from model.transformer import REMAT_POLICIES
from train import compiler_options, objectives, pairs, profile, stream

# The interval every numeric key of a stage config must lie in ("(0, inf)": > 0); rl/config.py
# checks config.rl's the same way.
RANGES = {
    "steps": "(0, inf)", "batch_size": "(0, inf)", "seq_len": "(0, inf)", "log_every": "(0, inf)",
    "checkpoint_every": "(0, inf)", "keep_checkpoints": "(0, inf)", "eval_every": "[0, inf)",
    "eval_batches": "[0, inf)", "peak_flops_per_device": "[0, inf)", "logits_chunk": "[0, inf)",
    "max_nonfinite_steps": "[0, inf)",
    "optim.lr": "(0, inf)", "optim.warmup_steps": "[0, inf)", "optim.end_lr_frac": "[0, 1]",
    "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.eps": "(0, inf)", "optim.weight_decay": "[0, inf)",
    "optim.clip_norm": "[0, inf)",
    "model.vocab_size": "(0, inf)", "model.d_model": "(0, inf)", "model.n_layers": "(0, inf)",
    "model.n_heads": "(0, inf)", "model.n_kv_heads": "(0, inf)", "model.head_dim": "[0, inf)",
    "model.mlp_dim": "(0, inf)", "model.rope_theta": "(0, inf)", "model.norm_eps": "(0, inf)",
    "model.rope_scaling.factor": "[0, inf)",
    "lora.rank": "[0, inf)", "lora.alpha": "(0, inf)", "lora.block_size": "(0, inf)",
    "reward.margin": "[0, inf)", "reward.logp_weight": "[0, inf)",
    "dpo.gamma": "[0, inf)", "dpo.orpo_lambda": "[0, inf)",
    "data.num_documents": "(0, inf)", "data.max_documents": "[0, inf)", "data.workers": "[0, 256]",
    "data.pair_rows": "[0, inf)", "data.builtin_slip": "[0, 1]",
    "tokenizer.max_training_chars": "[0, inf)",
}


def _inside(x: float, interval: str) -> bool:
  low, high = (float(v) for v in interval[1:-1].split(","))
  above = low < x if interval[0] == "(" else low <= x
  below = x < high if interval[-1] == ")" else x <= high
  return math.isfinite(x) and above and below


def check_ranges(section, ranges: dict, prefix: str = "config") -> None:
  """Raises UserError naming the first key of `ranges` ({"a.b": "[0, 1)"}) whose value in `section`
  lies outside its interval (keys the section lacks are skipped)."""
  for key, interval in ranges.items():
    value = section
    for part in key.split("."):
      value = value.get(part) if isinstance(value, (ml_collections.ConfigDict, dict)) else None
    if value is None or isinstance(value, bool):
      continue
    if not _inside(float(value), interval):
      low, high = interval[1:-1].split(", ")
      want = f"{'>' if interval[0] == '(' else '>='} {low}" if high == "inf" else f"in {interval}"
      raise UserError(f"{prefix}.{key}={value} must be {want}", hint="every key and its default: configs/sections.py")


def unknown_keys(cfg, schema, prefix="config") -> None:
  """Raises UserError naming the first key of `cfg` that `schema` lacks, with the closest one."""
  for key, value in cfg.items():
    name = f"{prefix}.{key}"
    if key not in schema:
      raise unknown(name, key, list(schema.keys()), prefix=f"{prefix}.")
    if isinstance(value, ml_collections.ConfigDict) and isinstance(schema[key], ml_collections.ConfigDict):
      unknown_keys(value, schema[key], name)


def _check_lora(lora, m, head_dim: int) -> None:
  """config.lora's base dtype and quantization (blocks run along each kernel's input axis)."""
  if lora.base_dtype not in ("float32", "bfloat16"):
    raise UserError(f"config.lora.base_dtype={lora.base_dtype!r}: use float32 | bfloat16")
  if lora.quantize not in quant.KINDS:
    raise UserError(f"config.lora.quantize={lora.quantize!r}: use {' | '.join(quant.KINDS)}")
  if lora.quantize == "none":
    return
  for key, n in (("d_model", m.d_model), ("mlp_dim", m.mlp_dim), ("head_dim", head_dim)):
    b = min(lora.block_size, n)
    if n % b or (lora.quantize == "nf4" and b % 2):
      raise UserError(f"config.lora.block_size={lora.block_size} does not split config.model.{key}={n} "
                      f"into {'even ' if lora.quantize == 'nf4' else ''}blocks",
                      hint="a divisor of d_model, mlp_dim and head_dim (or more than an axis: one block)")


def validate(config, num_devices: int, num_processes: int = 1) -> dict:
  """Raises UserError naming the offending key; returns the resolved mesh shape."""
  unknown_keys(config, base.base_config())
  objectives.get(config.objective)
  check_ranges(config, RANGES)
  m = config.model
  if m.n_heads % m.n_kv_heads:
    raise UserError(f"config.model.n_heads={m.n_heads} is not divisible by "
                    f"config.model.n_kv_heads={m.n_kv_heads}")
  head_dim = m.head_dim or m.d_model // m.n_heads
  if head_dim % 2:
    raise UserError(f"config.model.head_dim={head_dim} must be even for rotary embeddings")
  remats = ("none",) + tuple(REMAT_POLICIES)
  if m.remat not in remats:
    raise UserError(f"config.model.remat={m.remat!r}: use {' | '.join(remats)}")
  if m.attention not in ("auto", "xla", "cudnn", "splash"):
    raise UserError(f"config.model.attention={m.attention!r}: use auto | xla | cudnn | splash")
  if m.attention == "splash" and not splash.fits(config.seq_len):
    raise UserError(f"config.model.attention='splash' needs config.seq_len={config.seq_len} to be a multiple "
                    f"of {splash.BLOCKS[-1]} (the kernel's tiles)", hint="or use attention=auto")
  if m.attention == "cudnn" and m.dtype not in ("bfloat16", "float16"):
    raise UserError(f"config.model.attention='cudnn' needs config.model.dtype bfloat16 or float16, "
                    f"not {m.dtype!r} (or use attention=auto)")
  if config.data.pipeline not in ("cache", "stream"):
    raise UserError(f"config.data.pipeline={config.data.pipeline!r}: use cache | stream")
  if config.data.pipeline == "stream":
    stream.check(config)
  _check_lora(config.lora, m, head_dim)
  compiler_options.for_platform(config.compiler_options, "cpu")  # a known preset
  if config.logits_chunk and config.seq_len % config.logits_chunk:
    raise UserError(f"config.logits_chunk={config.logits_chunk} must divide config.seq_len={config.seq_len}",
                    hint="0 runs the LM head on the whole sequence at once")
  if config.data.chat_template not in tokenizer.TEMPLATES:
    raise UserError(f"config.data.chat_template={config.data.chat_template!r}: use {' | '.join(tokenizer.TEMPLATES)}",
                    hint="hf renders the tokenizer's own chat template (tokenizer_config.json)")
  profile.check(config)
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  data_ways = mesh["data"] * mesh["fsdp"]
  if config.batch_size % data_ways:
    raise UserError(f"config.batch_size={config.batch_size} is not divisible by the data axes "
                    f"(config.mesh.data * config.mesh.fsdp = {data_ways})")
  if config.batch_size % num_processes:
    raise UserError(f"config.batch_size={config.batch_size} is not divisible by the "
                    f"{num_processes} processes")
  if config.seq_len % mesh["sequence"]:
    raise UserError(f"config.seq_len={config.seq_len} is not divisible by config.mesh.sequence={mesh['sequence']}",
                    hint="each device of the sequence axis holds seq_len / mesh.sequence tokens of every row")
  accum = config.optim.grad_accum
  if accum < 1 or config.batch_size % accum or (config.batch_size // accum) % data_ways:
    raise UserError(f"config.optim.grad_accum={accum}: batch_size {config.batch_size} must split "
                    f"into {accum} micro-batches each divisible by the data axes ({data_ways})")
  pairs.check_packing(config, data_ways, num_processes)
  return mesh
