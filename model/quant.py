"""Block-absmax quantization of a frozen LoRA base: int8, or 4-bit NormalFloat (nf4, QLoRA).

A kernel is cut into blocks of `block` consecutive entries along its last input axis (the one
`model/dense.py` contracts last: qkv, gate_up: embed; down: mlp; out: head_dim); each block keeps
its absmax as a float32 scale, and its entries as codes of x / absmax in [-1, 1]:
- int8: round(127 x / absmax), dequantized as code * absmax / 127 (error <= absmax / 254);
- nf4: the nearest of the 16 NormalFloat levels (quantiles of a normal, exact 0 and +-1), two codes
  per uint8 (entry 2i in the low, 2i + 1 in the high nibble), dequantized as level * absmax.
A quantized kernel is a dict {"int8" | "nf4": codes, "scale": [.., n / block, ..]} in the params
tree where the kernel was: codes keep the kernel's shape (nf4: the block axis halved), so they
take the kernel's sharding. The model dequantizes one kernel at a time, inside the layer that
uses it (model/dense.py), so a full-precision copy of the whole base never exists.
"""
from collections.abc import Mapping

import flax.traverse_util as traverse
import jax.numpy as jnp
import numpy as np

from model.lora import INPUT_DIMS

KINDS = ("none", "int8", "nf4")
# The kernels quantized: the layers' matmuls. The embedding, the norms and the LM head (which the
# losses read directly, model/lm_head.py) stay in lora.base_dtype.
QUANTIZED = ("qkv", "out", "gate_up", "down")
# The NormalFloat4 levels of QLoRA (Dettmers et al. 2023), ascending: tests/test_quant.py derives them.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def block_size(n: int, block: int) -> int:
  """Entries per block along an axis of n: `block`, or the whole axis if shorter."""
  b = min(block, n)
  if n % b:
    raise ValueError(f"config.lora.block_size={block} does not divide a quantized axis of {n} entries")
  return b


def _blocked(x, axis: int, b: int):
  """x [.., n, ..] -> [.., n / b, b, ..] (blocks along `axis`)."""
  return x.reshape(x.shape[:axis] + (x.shape[axis] // b, b) + x.shape[axis + 1:])


def quantize(w, axis: int, kind: str, block: int) -> dict:
  """{kind: codes, "scale": absmax per block} of the kernel w, blocks along `axis`."""
  b = block_size(w.shape[axis], block)
  if kind == "nf4" and b % 2:
    raise ValueError(f"config.lora.block_size={block}: nf4 packs two entries per byte, blocks must be even")
  wb = _blocked(w.astype(jnp.float32), axis, b)                       # [.., n / b, b, ..]
  scale = jnp.max(jnp.abs(wb), axis=axis + 1, keepdims=True)          # [.., n / b, 1, ..]
  x = wb / jnp.where(scale > 0, scale, 1.0)                           # in [-1, 1]
  if kind == "int8":
    codes = jnp.round(x * 127).astype(jnp.int8).reshape(w.shape)
  elif kind == "nf4":
    mids = (NF4[1:] + NF4[:-1]) / 2                                    # 15 decision thresholds
    code = sum((x > m).astype(jnp.uint8) for m in mids.astype(np.float32))   # nearest level
    code = code.reshape(w.shape)
    even, odd = (jnp.take(code, jnp.arange(i, w.shape[axis], 2), axis=axis) for i in (0, 1))
    codes = even | (odd << 4)                                          # [.., n / 2, ..] uint8
  else:
    raise ValueError(f"config.lora.quantize={kind!r}: use one of {KINDS}")
  return {kind: codes, "scale": jnp.squeeze(scale, axis + 1)}


def dequantize(q: dict, axis: int, dtype):
  """The kernel of `quantize`'s dict, in dtype (computed in float32, elementwise: one fusion)."""
  scale = q["scale"]
  if "int8" in q:
    x = q["int8"].astype(jnp.float32) / 127
  else:
    packed = q["nf4"]
    pair = jnp.stack([packed & 15, packed >> 4], axis=axis + 1)       # [.., n / 2, 2, ..]
    code = pair.reshape(packed.shape[:axis] + (-1,) + packed.shape[axis + 1:])
    x = jnp.zeros(code.shape, jnp.float32)
    for i, level in enumerate(NF4.astype(np.float32)):               # a select per level, no gather
      x = jnp.where(code == i, level, x)
  return (x * jnp.repeat(scale, x.shape[axis] // scale.shape[axis], axis=axis)).astype(dtype)


def is_quantized(leaf) -> bool:
  """Whether a params entry is a quantized kernel (a dict of codes and scales, not a module's params)."""
  return isinstance(leaf, Mapping) and set(leaf) in ({"int8", "scale"}, {"nf4", "scale"})


def kernel_axis(path: str) -> int:
  """The block axis of the kernel at `path` in a params tree (scanned layers lead with [layers])."""
  lead = 1 if path.startswith("layers/") else 0
  return lead + INPUT_DIMS[path.rsplit("/", 1)[-1]] - 1


def quantized(path: str, kind: str) -> bool:
  return kind != "none" and path.rsplit("/", 1)[-1] in QUANTIZED


def store(path: str, w, lora_cfg):
  """One leaf of the frozen base as the train step holds it: quantized, or cast to base_dtype."""
  if quantized(path, lora_cfg.quantize):
    return quantize(w, kernel_axis(path), lora_cfg.quantize, lora_cfg.block_size)
  return w.astype(lora_cfg.base_dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w


def as_stored(params, lora_cfg):
  """The base the adapters were trained over, back in the params' dtypes: cast to base_dtype (and
  quantized) and back, for merging a LoRA run's adapters into the model it actually trained."""
  flat = traverse.flatten_dict(params, sep="/")
  out = {}
  for path, w in flat.items():
    s = store(path, w, lora_cfg)
    out[path] = (dequantize(s, kernel_axis(path), w.dtype) if is_quantized(s) else s.astype(w.dtype))
  return traverse.unflatten_dict(out, sep="/")
