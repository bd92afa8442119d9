"""The layers' matmuls: x @ W with W plain or quantized (model/quant.py), plus LoRA unmerged.

A layer's params may hold, next to a kernel `name`, its adapters `name_lora_a` [*in, r] (already
scaled by alpha / r) and `name_lora_b` [r, *out] (model/lora.py `attach`): the layer computes
x @ W + (x @ A) @ B. No [in, out] array besides the kernel itself exists in a train step: the
adapters' gradients are x^T (dy B^T) [in, r] and (x A)^T dy [r, out], and the frozen kernel gets
none. A quantized kernel is dequantized inside `jax.checkpoint`, so the backward pass dequantizes
it again instead of keeping the full-precision copy: with scan_layers, one layer's at a time.
"""
import math

import flax.linen as nn
import jax

from model import lora, quant, sharding


def matmul(x, kernel, n_in: int):
  """x [b, t, *in] times kernel [*in, *out] -> [b, t, *out], contracting the n_in `in` axes.

  Computed as ONE 2-D matmul [b * t, prod(in)] @ [prod(in), prod(out)] (the reshapes are free):
  XLA:CPU runs 2-D dots, and their transposes in the backward pass, ~6-10% faster per train step
  than the same einsum with several contracting or output axes. Under a mesh whose `tensor` axis
  splits devices the output axes stay separate: the MLP's [embed, 2, mlp] kernel is sharded on
  `mlp`, and merged into [embed, 2 * mlp] its shards are no longer column blocks, so every step
  all-gathered the whole kernel (forward) and the [b, t, 2, mlp] activation gradient (backward).
  Under a mesh whose `sequence` axis splits the rows, b and t stay separate too: merged, the
  shards of t would not be row blocks of [b * t] and every activation would be all-gathered."""
  b, t = x.shape[:2]
  k = math.prod(kernel.shape[:n_in])
  out = kernel.shape[n_in:]
  if sharding.mesh_axis_size("sequence") > 1:
    return jax.lax.dot_general(x.reshape(b, t, k), kernel.reshape((k,) + out), (((2,), (0,)), ((), ())))
  if sharding.mesh_axis_size("tensor") > 1:
    y = jax.lax.dot_general(x.reshape(b * t, k), kernel.reshape((k,) + out), (((1,), (0,)), ((), ())))
  else:
    y = x.reshape(b * t, k) @ kernel.reshape(k, -1)
  return y.reshape((b, t) + out)


def dense(module, name: str, x, n_in: int, shape, axes, cfg):
  """x [b, t, *in] -> [b, t, *out] (cfg.dtype) through `module`'s kernel `name` of `shape` [*in,
  *out] (a param with logical `axes`, created at init) and its adapters if the params hold them."""
  w = module.get_variable("params", name) if module.has_variable("params", name) else None
  if quant.is_quantized(w):
    y = jax.checkpoint(lambda x, q: matmul(x, quant.dequantize(q, n_in - 1, cfg.dtype), n_in))(x, w)
  else:
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)
    y = matmul(x, module.param(name, init, shape, cfg.param_dtype).astype(cfg.dtype), n_in)
  if module.has_variable("params", name + lora.A):
    a = module.get_variable("params", name + lora.A).astype(cfg.dtype)   # [in, r]
    b = module.get_variable("params", name + lora.B).astype(cfg.dtype)   # [r, out]
    y = y + (x.reshape(x.shape[:2] + (-1,)) @ a @ b).reshape(y.shape)
  return y
