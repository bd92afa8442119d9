"""A model's parameter tree before any memory is spent on it: abstract shapes, shardings and the
init function, from `jax.eval_shape` (training state, run directories and evaluation start here)."""
import math

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from model import lora, quant, sharding


def abstract_params(model, seq_len: int, mesh, extra_params=None):
  """(abstract params, their shardings, boxed init fn, boxed abstract params), no allocation.

  `extra_params(model_cfg, rng) -> {name: params}` (an objective's heads) are added at the top
  level of the tree, replicated.
  """
  model_init = lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]  # tokens [1, seq]
  init_boxed = model_init
  if extra_params is not None:
    init_boxed = lambda rng: {**model_init(rng), **extra_params(model.cfg, jax.random.fold_in(rng, 1))}
  boxed = jax.eval_shape(lambda: init_boxed(jax.random.key(0)))
  return sharding.unbox(boxed), sharding.tree_shardings(boxed, mesh), init_boxed, boxed


def _fit(named: NamedSharding, shape) -> NamedSharding:
  """`named`'s layout for an array of `shape` (same rank), replicating dims its axes do not divide."""
  spec = tuple(named.spec) + (None,) * (len(shape) - len(named.spec))
  sizes = [math.prod(named.mesh.shape[a] for a in ((e,) if isinstance(e, str) else tuple(e or ())))
           for e in spec]
  return NamedSharding(named.mesh, P(*(e if n % s == 0 else None for e, n, s in zip(spec, shape, sizes))))


def lora_shapes(lora_cfg, abs_params, param_shardings, mesh):
  """(abstract adapters, their shardings, abstract frozen base, its shardings) of a LoRA run.

  Adapters are replicated. The base is as the step holds it (model/quant.py `store`): in
  lora.base_dtype, or quantized, the codes and scales of a kernel laid out like the kernel."""
  abs_train = jax.eval_shape(lambda p: lora.init_adapters(p, lora_cfg, jax.random.key(0)), abs_params)
  train_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), abs_train)
  flat, flat_sh = traverse.flatten_dict(abs_params, sep="/"), traverse.flatten_dict(param_shardings, sep="/")
  frozen = {p: jax.eval_shape(lambda w, p=p: quant.store(p, w, lora_cfg), a) for p, a in flat.items()}
  frozen_sh = {p: jax.tree.map(lambda x, p=p: _fit(flat_sh[p], x.shape), f) for p, f in frozen.items()}
  unflat = lambda t: traverse.unflatten_dict(t, sep="/")
  return abs_train, train_sh, unflat(frozen), unflat(frozen_sh)
