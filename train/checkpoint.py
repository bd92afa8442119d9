"""Orbax checkpoints: async saves every N steps, keep K, resume from the latest, restore sharded.

Layout of one step: `params` and `opt_state` (sharded arrays) and `meta` (JSON: step, data
iterator state). `init_from` reads only `params` of another run, so any stage can start from any
earlier stage whatever optimizer it used.
"""
import logging
import os

import jax
import orbax.checkpoint as ocp

HF_PREFIX = "hf:"  # init_from="hf:/path/to/dir": a Hugging Face checkpoint directory (model/convert.py)


class _QuietReadOnly(logging.Filter):
  """Drops orbax's warning for every read-only manager (each restore of another run opens one)."""

  def filter(self, record):
    return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


def absolute(path: str) -> str:
  """os.path.abspath that keeps the hf: prefix."""
  if path.startswith(HF_PREFIX):
    return HF_PREFIX + os.path.abspath(os.path.expanduser(path[len(HF_PREFIX):]))
  return os.path.abspath(path)


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               item_names=("params", "opt_state", "meta"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict, force=False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta)), force=force)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, param_shardings,
            abstract_opt, opt_shardings):
  """Restores (params, opt_state, meta) of `step` straight into their shardings."""
  out = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(abstract_params, param_shardings)),
      opt_state=ocp.args.StandardRestore(_abstract(abstract_opt, opt_shardings)),
      meta=ocp.args.JsonRestore()))
  return out.params, out.opt_state, out.meta


def checkpoint_dir(path: str) -> str:
  """`path` may be a run's workdir or its checkpoints/ folder."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def latest_step(path: str):
  """The latest finished step of a run's checkpoints (None if none; 0 for a hf: directory)."""
  if path.startswith(HF_PREFIX):
    return 0
  mngr = ocp.CheckpointManager(os.path.abspath(checkpoint_dir(path)),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                   save_interval_steps=0))
  step = mngr.latest_step()
  mngr.close()
  return step


def stored_keys(directory: str, step: int) -> set:
  """Top-level names of the params tree saved at `step` (read from metadata, no arrays)."""
  from etils import epath
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / "params")
  return set(tree.keys())


def restore_params(path: str, abstract_params, param_shardings, step=None, missing_ok=()):
  """The full params of another run's latest (or given) step: `init_from`, eval, sampling.

  A LoRA run stores only its adapters; they are merged into its base (restored the same way).
  Top-level entries of `abstract_params` named in `missing_ok` (e.g. a reward head the SFT run
  does not have) may be absent from the checkpoint: they are left out of the result, and the
  caller initialises them. Stored entries that `abstract_params` lacks are not read.
  `path` = "hf:DIR" reads a Hugging Face directory instead (step 0).
  """
  if path.startswith(HF_PREFIX):
    from model import convert
    return convert.load_hf(path[len(HF_PREFIX):], abstract_params, param_shardings, missing_ok), 0
  directory = os.path.abspath(checkpoint_dir(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.init_from: no checkpoint directory at {directory}")
  mngr = ocp.CheckpointManager(directory, item_names=("params", "opt_state", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                   save_interval_steps=0))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"config.init_from: {directory} holds no finished checkpoint")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {}
  if meta.get("lora"):
    import ml_collections
    from jax.sharding import NamedSharding, PartitionSpec as P
    from model import lora
    base, _ = restore_params(meta["lora"]["base"], abstract_params, param_shardings, missing_ok=missing_ok)
    abstract_params = {k: abstract_params[k] for k in base}
    param_shardings = {k: param_shardings[k] for k in base}
    lora_cfg = ml_collections.ConfigDict(meta["lora"]["config"])
    abs_ad = jax.eval_shape(lambda p: lora.init_adapters(p, lora_cfg, jax.random.key(0)), abstract_params)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    ad_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), abs_ad)
    adapters = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(abs_ad, ad_sh)))).params
    mngr.close()
    merged = jax.jit(lambda b, a: lora.merge(b, a, lora_cfg), out_shardings=param_shardings)
    return merged(base, adapters), step
  stored = stored_keys(directory, step)
  missing = set(abstract_params) - stored
  if missing - set(missing_ok):
    raise ValueError(f"{directory} step {step} has no params {sorted(missing - set(missing_ok))} "
                     f"(it holds {sorted(stored)})")
  keys = [k for k in abstract_params if k in stored]
  target = _abstract({k: abstract_params[k] for k in keys}, {k: param_shardings[k] for k in keys})
  if stored - set(keys):  # read only the entries asked for
    args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
  else:
    args = ocp.args.StandardRestore(target)
  out = mngr.restore(step, args=ocp.args.Composite(params=args))
  mngr.close()
  return out.params, step
