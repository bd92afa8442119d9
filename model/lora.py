"""Low-rank adapters: x @ W + (alpha / r) (x @ A) @ B on the kernels whose path matches a target.

In this codebase's `x @ W` convention a kernel is [inputs..., outputs...]; A is [in, r] (random)
and B is [r, out] (zero), so an adapted model starts exactly equal to its base. Adapters are a
separate pytree {kernel path: {"a", "b"}}: the optimizer only ever sees them and the base stays
frozen (in lora.base_dtype, or quantized: model/quant.py). In training, scoring and sampling
`attach` hands them to the model next to their kernels, which applies them unmerged
(model/dense.py); `merge` folds them into full params once, for export and the next stage. With
adapters dropped, the base itself is the reference model of the preference / RL stages: no
second copy of the weights.
"""
import math
import re

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp

# How many leading (input) dims each kernel has; the rest are outputs. `out` maps heads -> embed.
INPUT_DIMS = {"qkv": 1, "out": 3, "gate_up": 1, "down": 1, "lm_head": 1}
A, B = "_lora_a", "_lora_b"  # a kernel's adapters in the params the model takes: `qkv_lora_a` ...


def targeted(params, targets) -> dict:
  """{path string: kernel} for every kernel matched by one of the `targets` regexes."""
  flat = traverse.flatten_dict(params, sep="/")
  out = {p: w for p, w in flat.items() if any(re.search(t, p) for t in targets)}
  for p in out:
    if p.rsplit("/", 1)[-1] not in INPUT_DIMS:
      raise ValueError(f"config.lora.targets: {p} is not a matrix LoRA can adapt "
                       f"(adaptable kernels: {sorted(INPUT_DIMS)})")
  return out


def _split(path: str, shape):
  """(leading layer dims, input size, output size) of a kernel; scanned kernels have a layers dim."""
  lead = 1 if path.startswith("layers/") else 0
  k = INPUT_DIMS[path.rsplit("/", 1)[-1]]
  return shape[:lead], math.prod(shape[lead:lead + k]), math.prod(shape[lead + k:])


def init_adapters(params, lora_cfg, rng) -> dict:
  """{path: {"a": [.., in, r], "b": [.., r, out]}}; A ~ N(0, 1/in), B = 0."""
  kernels = targeted(params, lora_cfg.targets)
  if not kernels:
    raise ValueError(f"config.lora.targets={list(lora_cfg.targets)} match no parameter")
  adapters = {}
  for i, (path, w) in enumerate(sorted(kernels.items())):
    lead, n_in, n_out = _split(path, w.shape)
    a = jax.random.normal(jax.random.fold_in(rng, i), lead + (n_in, lora_cfg.rank), jnp.float32)
    adapters[path] = {"a": a / math.sqrt(n_in), "b": jnp.zeros(lead + (lora_cfg.rank, n_out), jnp.float32)}
  return adapters


def merge(params, adapters: dict, lora_cfg):
  """Base params with every adapter folded in: W + (alpha / r) * A @ B (same shapes as W)."""
  scale = lora_cfg.alpha / lora_cfg.rank
  flat = traverse.flatten_dict(params, sep="/")
  for path, ab in adapters.items():
    w = flat[path]
    delta = jnp.matmul(ab["a"], ab["b"]) * scale  # [.., in, out]
    flat[path] = (w + delta.reshape(w.shape).astype(w.dtype))
  return traverse.unflatten_dict(flat, sep="/")


def attach(params, adapters: dict, lora_cfg):
  """The params the model takes: the base with each kernel's adapters next to it, A scaled by
  alpha / r ([.., in, r]; B [.., r, out]), applied unmerged by model/dense.py. The LM head, whose
  kernel the losses read directly (model/lm_head.py), gets its adapter merged."""
  scale = lora_cfg.alpha / lora_cfg.rank
  flat = traverse.flatten_dict(params, sep="/")
  for path, ab in adapters.items():
    if path.rsplit("/", 1)[-1] == "lm_head":
      flat[path] = merge({"lm_head": flat[path]}, {"lm_head": ab}, lora_cfg)["lm_head"]
    else:
      flat[path + A], flat[path + B] = ab["a"] * scale, ab["b"]
  return traverse.unflatten_dict(flat, sep="/")


def count(adapters: dict) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))
