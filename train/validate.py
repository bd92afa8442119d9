"""Config checks run at start: each failure names the key and what is wrong with it."""
import ml_collections

from configs import base
from model import sharding
from train import objectives, profile


def _unknown_keys(cfg, schema, prefix="config"):
  out = []
  for key, value in cfg.items():
    name = f"{prefix}.{key}"
    if key not in schema:
      out.append(name)
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(schema[key], ml_collections.ConfigDict):
      out += _unknown_keys(value, schema[key], name)
  return out


def validate(config, num_devices: int, num_processes: int = 1) -> dict:
  """Raises ValueError naming the offending key; returns the resolved mesh shape."""
  unknown = _unknown_keys(config, base.base_config())
  if unknown:
    raise ValueError(f"unknown config keys: {', '.join(unknown)} (not in configs/base.py)")
  objectives.get(config.objective)
  m = config.model
  if m.n_heads % m.n_kv_heads:
    raise ValueError(f"config.model.n_heads={m.n_heads} is not divisible by "
                     f"config.model.n_kv_heads={m.n_kv_heads}")
  head_dim = m.head_dim or m.d_model // m.n_heads
  if head_dim % 2:
    raise ValueError(f"config.model.head_dim={head_dim} must be even for rotary embeddings")
  if m.remat not in ("none", "full", "dots"):
    raise ValueError(f"config.model.remat={m.remat!r}: use none | full | dots")
  if m.attention not in ("auto", "xla", "cudnn"):
    raise ValueError(f"config.model.attention={m.attention!r}: use auto | xla | cudnn")
  if m.attention == "cudnn" and m.dtype not in ("bfloat16", "float16"):
    raise ValueError(f"config.model.attention='cudnn' needs config.model.dtype bfloat16 or float16, "
                     f"not {m.dtype!r} (or use attention=auto)")
  for key in ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "keep_checkpoints"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  profile.check(config)
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  data_ways = mesh["data"] * mesh["fsdp"]
  if config.batch_size % data_ways:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data axes "
                     f"(config.mesh.data * config.mesh.fsdp = {data_ways})")
  if config.batch_size % num_processes:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{num_processes} processes")
  accum = config.optim.grad_accum
  if accum < 1 or config.batch_size % accum or (config.batch_size // accum) % data_ways:
    raise ValueError(f"config.optim.grad_accum={accum}: batch_size {config.batch_size} must split "
                     f"into {accum} micro-batches each divisible by the data axes ({data_ways})")
  return mesh
