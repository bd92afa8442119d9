"""Device mesh and logical-axis sharding rules.

Parameters and activations are annotated with logical axis names; RULES maps them onto the mesh
axes `data` (pure data parallel), `fsdp` (data parallel with sharded weights and optimizer state),
`sequence` (every row's tokens split across devices: context parallelism, model/context_parallel.py)
and `tensor` (heads / mlp / vocab split across devices). A dimension whose size the mesh axes do
not divide is replicated instead, so every preset runs on every mesh.
"""
import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.errors import UserError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")  # `tensor` on the nearest devices

RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("q_group", None),
    ("gate_up", None),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """Resolves config.mesh ({data, fsdp, sequence, tensor}, at most one -1 = the rest; an axis left
  out has size 1) for num_devices."""
  sizes = {a: int(dict(mesh_cfg).get(a, 1)) for a in MESH_AXES}
  unknown = set(dict(mesh_cfg)) - set(MESH_AXES)
  if unknown:
    raise UserError(f"config.mesh: unknown axes {sorted(unknown)}; use {MESH_AXES}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise UserError(f"config.mesh: only one axis may be -1, got {free}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise UserError(f"config.mesh.{a}={s}: must be a positive size or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise UserError(f"config.mesh: {sizes} does not divide the {num_devices} devices "
                      f"(the fixed axes multiply to {fixed})")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"config.mesh: {sizes} has {fixed} devices but {num_devices} are available")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A (data, fsdp, sequence, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # CPU / unusual topologies: plain row-major order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def data_axis_size(mesh: Mesh) -> int:
  """Number of ways the batch is split (data * fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Activates the mesh and the logical rules, so `constrain` inside jitted code takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def mesh_axis_size(name: str) -> int:
  """Size of axis `name` of the mesh active while tracing (`use_mesh`); 1 outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(name, 1)


def mesh_platform():
  """Platform ("cpu", "gpu", "tpu") of the devices of the mesh active while tracing (`use_mesh`),
  i.e. of the devices the step is compiled for; None outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return None if device is None else device.platform


def constrain(x, logical_axes):
  """Sharding constraint by logical names; a no-op outside `use_mesh`."""
  return nn.with_logical_constraint(x, logical_axes)


def spec_for(logical_axes, shape, mesh: Mesh) -> P:
  """PartitionSpec for an array with these logical axes, replicating non-divisible dims."""
  if logical_axes is None:
    return P()
  mesh_axes = nn.logical_to_mesh_axes(logical_axes, RULES)
  out = []
  for dim, axes in zip(shape, mesh_axes):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def tree_shardings(abstract_boxed, mesh: Mesh):
  """NamedShardings for a pytree whose leaves may be nn.Partitioned (from eval_shape of init)."""
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def unbox(tree):
  """Strips nn.Partitioned boxes (plain values; unlike nn.meta.unbox, adds no constraint)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2, length: int = 0) -> NamedSharding:
  """Batch arrays: leading axis over (data, fsdp); the second (the tokens of a row, `length` of
  them) over `sequence` when it divides them; the rest replicated."""
  ways = mesh.shape["sequence"]
  seq = "sequence" if ways > 1 and length and length % ways == 0 else None
  rest = [seq] + [None] * (ndim - 2) if ndim > 1 else []
  return NamedSharding(mesh, P(("data", "fsdp"), *rest))


def put_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy rows -> one global jax.Array per key, sharded over the batch axes (rows)
  and `sequence` (tokens)."""
  return {k: jax.make_array_from_process_local_data(
              batch_sharding(mesh, v.ndim, v.shape[1] if v.ndim > 1 else 0), v)
          for k, v in local_batch.items()}
