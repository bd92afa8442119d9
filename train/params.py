"""A model's parameter tree before any memory is spent on it: abstract shapes, shardings and the
init function, from `jax.eval_shape` (training state, run directories and evaluation start here)."""
import jax
import jax.numpy as jnp

from model import sharding


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
