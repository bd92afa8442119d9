"""The run directory: its checkpoints, config and Hugging Face files are read and written here.
(The trainers add their logs: metrics.jsonl, tb/, samples.jsonl, profile/.)

    DIR/checkpoints/<step>/  orbax: `params`, `opt_state` (sharded arrays), `meta` (JSON: step,
                             data iterator state, LoRA base), kiln_checksums.json; async saves, keep K
    DIR/checkpoints-corrupt/ steps that failed their checksums or did not restore (train/checksums.py)
    DIR/config.json          the run's full config (the template of its evaluation)
    DIR/hf_config.json       the Hugging Face config.json the run descends from, if any
    DIR/tokenizer/           the run's tokenizer, stored when it starts (train/run_tokenizer.py)
    DIR/.lock                held by the process training in DIR (`locked`): one run per directory

A resume takes the newest step that restores completely: a newer bad one is named and moved aside
(`restore_newest`); a reader (`restore_params`) skips it. A save that fails (disk full) stops the
run at the next step with a UserError naming the path and the last good step (train/checkpoints.py).

`init_from` reads only `params` of another run, so any stage can start from any earlier stage
whatever optimizer it used; "hf:DIR" reads a Hugging Face directory instead. Import and export of
Hugging Face checkpoints (the tensor mapping is model/convert.py):

    python -m train.rundir --workdir WORKDIR --config.import_hf=HF_DIR  # -> a run dir init_from reads
    python -m train.rundir --workdir WORKDIR --config.export_hf=HF_DIR  # latest params (LoRA merged)
"""
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import orbax.checkpoint as ocp

from configs import base, sections, tools
from configs.errors import UserError
from model import convert, hf_config, lora, quant, sharding
from model.tokenizer import Tokenizer
from model.transformer import ModelConfig, Transformer
from train import checkpoints, checksums, cli, files, run_tokenizer
from train import params as params_lib

HF_PREFIX = "hf:"  # init_from="hf:/path/to/dir": a Hugging Face checkpoint directory
CONFIG = "config.json"
HF_CONFIG = "hf_config.json"
LOCK = ".lock"


class _QuietReadOnly(logging.Filter):
  """Drops orbax's warning for every read-only manager (each restore of another run opens one)."""

  def filter(self, record):
    return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


def absolute(path: str) -> str:
  """files.absolute (a local path made absolute, a gs:// URL as it is) that keeps the hf: prefix."""
  if path.startswith(HF_PREFIX):
    return HF_PREFIX + files.absolute(path[len(HF_PREFIX):])
  return files.absolute(path)


def hf_dir(path: str) -> str:
  """The local directory of "hf:DIR" (a gs:// DIR is downloaded once: safetensors reads local files)."""
  return files.local(path[len(HF_PREFIX):])


class WorkdirInUse(UserError):
  """Another process is training in this run directory."""


@contextlib.contextmanager
def locked(workdir: str):
  """Holds DIR/.lock (an flock) while the block runs: a second process that trains in the same
  directory stops at once with WorkdirInUse naming the holder's host and pid, before it writes
  anything. The kernel drops the lock when its holder exits, however it exits (kill -9 included).
  Only process 0 of a multi-process run takes it (they share the directory). A gs:// workdir has
  no flock: see `_object_lock`."""
  if jax.process_index() != 0:
    yield
    return
  if files.is_url(workdir):
    with _object_lock(workdir):
      yield
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise WorkdirInUse(f"{os.path.abspath(workdir)} is in use by {holder}: one run per workdir",
                         hint="wait for it, stop it, or pick another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _object_lock(workdir: str):
  """locked() of a gs:// workdir: DIR/.lock is an object created only if absent (an upload with
  if-generation-match=0) and deleted when the block ends. A holder killed without cleaning up
  leaves it: the next run on the same host whose pid is gone takes it over; elsewhere the error
  names the holder and the object to delete."""
  path, me = os.path.join(workdir, LOCK), f"host {socket.gethostname()} pid {os.getpid()}"
  if not files.create_new(path, me + "\n"):
    holder = "another process"
    if files.exists(path):
      with files.open(path) as f:
        holder = f.read().strip() or holder
    if not _dead_here(holder):
      raise WorkdirInUse(f"{workdir} is in use by {holder}: one run per workdir",
                         hint=f"wait for it, stop it, or pick another --workdir (if {holder} is gone, "
                              f"delete {path})")
    files.write_atomic(path, me + "\n")
  try:
    yield
  finally:
    files.remove(path)


def _dead_here(holder: str) -> bool:
  """Whether lock text "host H pid P" names a process of this host that no longer runs."""
  parts = holder.split()
  if len(parts) != 4 or parts[1] != socket.gethostname() or not parts[3].isdigit():
    return False
  try:
    os.kill(int(parts[3]), 0)
  except ProcessLookupError:
    return True
  except OSError:
    return False
  return False


def manager(workdir: str, keep: int, async_save: bool = True) -> checkpoints.Manager:
  return checkpoints.Manager(files.absolute(os.path.join(workdir, "checkpoints")), keep, async_save)


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


def restore_newest(mngr: ocp.CheckpointManager, abstract_params, param_shardings, abstract_opt,
                   opt_shardings):
  """Resume: (step, params, opt_state, meta, note) of the newest step of `mngr` that restores
  completely, or None when the run has no checkpoint. Each newer step that failed its checksums
  or did not restore is moved to DIR/checkpoints-corrupt/ (by process 0; never deleted) and named
  in `note`. Raises UserError if steps exist and none restores (then only steps that failed their
  checksums are moved: an error on every step is a config that does not fit, not corruption)."""
  directory = str(mngr.directory)
  step, out, bad, verdict = checkpoints.newest_that_restores(
      directory, mngr.all_steps(),
      lambda s: restore(mngr, s, abstract_params, param_shardings, abstract_opt, opt_shardings))
  moved = [b for b in bad if step is not None or b[3] is None]
  where = checkpoints.set_aside(mngr, {s: reason for s, reason, *_ in moved})
  moved = [(s, reason, f"moved to {where[s]}: {detail}", e) for s, reason, detail, e in moved]
  if step is None:
    if bad:
      raise checkpoints.none_restores(directory, moved + [b for b in bad if b[3] is not None]) from bad[0][3]
    return None
  notes = [f"step {s} {reason}, {detail}" for s, reason, detail, _ in moved]
  if verdict == checksums.UNVERIFIED:
    notes.append(f"step {step} has no {checksums.FILE} (saved before checksums): not verified")
  return (step, *out, "; ".join(notes))


def checkpoint_dir(path: str) -> str:
  """The absolute checkpoints/ folder of `path`, a run's workdir or that folder itself (orbax reads
  absolute paths only: a relative `init_from` of a PPO stage failed reading the reward head)."""
  sub = os.path.join(path, "checkpoints")
  return files.absolute(sub if files.isdir(sub) else path)


def _reader(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_names=checkpoints.ITEMS, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0))


def latest_step(path: str):
  """The latest finished step of a run's checkpoints (None if none; 0 for a hf: directory); a
  newest step that fails its checksums does not count (restore_params skips it)."""
  if path.startswith(HF_PREFIX):
    return 0
  directory = checkpoint_dir(path)
  mngr = _reader(directory)
  steps = mngr.all_steps()
  mngr.close()
  step, _, _, _ = checkpoints.newest_that_restores(directory, steps, lambda s: None, skip=("opt_state",))
  return step


def stored_keys(directory: str, step: int) -> set:
  """Top-level names of the params tree saved at `step` (read from metadata, no arrays)."""
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / "params")
  return set(tree.keys())


def restore_params(path: str, abstract_params, param_shardings, step=None, missing_ok=()):
  """The full params of another run's latest (or given) step: `init_from`, eval, sampling.

  A LoRA run stores only its adapters; they are merged into its base (restored the same way, then
  cast and quantized as the run's lora.base_dtype / lora.quantize had it, and back).
  Top-level entries of `abstract_params` named in `missing_ok` (e.g. a reward head the SFT run
  does not have) may be absent from the checkpoint: they are left out of the result, and the
  caller initialises them. Stored entries that `abstract_params` lacks are not read.
  `path` = "hf:DIR" reads a Hugging Face directory instead (step 0).
  The latest step is the newest that passes its checksums and restores (train/checksums.py): a
  newer bad one is skipped with a line on stderr, and left where it is (the run that owns it moves
  it aside when it resumes).
  """
  if path.startswith(HF_PREFIX):
    return convert.load_hf(hf_dir(path), abstract_params, param_shardings, missing_ok), 0
  directory = checkpoint_dir(path)
  if not files.isdir(directory):
    raise UserError(f"{path}: no such directory", hint="give the --workdir of a run that saved a checkpoint")
  mngr = _reader(directory)
  steps = mngr.all_steps() if step is None else [step]
  if not steps:
    mngr.close()
    raise UserError(f"{path}: no finished checkpoint yet",
                    hint="let its run save one (config.checkpoint_every; Ctrl-C saves one), or give another run")
  try:
    found, params, bad, _ = checkpoints.newest_that_restores(
        directory, steps, lambda s: _restore_params_at(mngr, directory, s, abstract_params,
                                                       param_shardings, missing_ok), skip=("opt_state",))
  finally:
    mngr.close()
  if found is None:
    raise checkpoints.none_restores(directory, bad) from next((b[3] for b in bad if b[3] is not None), None)
  if bad and jax.process_index() == 0:
    print(f"kiln: {directory}: {checkpoints.describe(bad)}; using step {found}", file=sys.stderr)
  return params, found


def _restore_params_at(mngr, directory: str, step: int, abstract_params, param_shardings, missing_ok):
  """restore_params of one step."""
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {}
  if meta.get("lora"):
    frozen, _ = restore_params(meta["lora"]["base"], abstract_params, param_shardings, missing_ok=missing_ok)
    abstract_params = {k: abstract_params[k] for k in frozen}
    param_shardings = {k: param_shardings[k] for k in frozen}
    lora_cfg = ml_collections.ConfigDict({**sections.lora().to_dict(), **meta["lora"]["config"]})
    abs_ad = jax.eval_shape(lambda p: lora.init_adapters(p, lora_cfg, jax.random.key(0)), abstract_params)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    ad_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), abs_ad)
    adapters = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(abs_ad, ad_sh)))).params
    # into the base the adapters were trained over (in lora.base_dtype, or quantized, and back)
    merged = jax.jit(lambda b, a: lora.merge(quant.as_stored(b, lora_cfg), a, lora_cfg),
                     out_shardings=param_shardings)
    return merged(frozen, adapters)
  stored = stored_keys(directory, step)
  missing = set(abstract_params) - stored
  if missing - set(missing_ok):
    raise UserError(f"{directory} step {step} has no params {sorted(missing - set(missing_ok))} "
                    f"(it holds {sorted(stored)})")
  keys = [k for k in abstract_params if k in stored]
  target = _abstract({k: abstract_params[k] for k in keys}, {k: param_shardings[k] for k in keys})
  if stored - set(keys):  # read only the entries asked for
    args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
  else:
    args = ocp.args.StandardRestore(target)
  return mngr.restore(step, args=ocp.args.Composite(params=args)).params


# ----------------------------------------------------------------------------- config


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """DIR/config.json: the config the run was trained with."""
  path = os.path.join(workdir, CONFIG)
  if not files.exists(path):
    raise UserError(f"{path}: no such file",
                    hint="give the directory of a `python -m train` run (it has config.json)")
  with files.open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def save_config(workdir: str, config) -> None:
  """Writes DIR/config.json (process 0 only)."""
  if jax.process_index() == 0:
    files.makedirs(workdir)
    with files.open(os.path.join(workdir, CONFIG), "w") as f:
      f.write(config.to_json(indent=2))


def read_hf_config(workdir: str):
  """DIR/hf_config.json (a dict), or None when the run does not descend from a HF checkpoint."""
  path = os.path.join(workdir, HF_CONFIG)
  if not files.isfile(path):
    return None
  with files.open(path) as f:
    return json.load(f)


def save_hf_config(workdir: str, hf: dict) -> None:
  """Writes DIR/hf_config.json (process 0 only): later stages and export know the HF origin."""
  if jax.process_index() == 0:
    files.makedirs(workdir)
    with files.open(os.path.join(workdir, HF_CONFIG), "w") as f:
      json.dump(hf, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- a finished run


@dataclasses.dataclass
class LoadedRun:
  """A run directory read back for evaluation or sampling: config, model, params, tokenizer."""
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  model: Transformer
  params: Any
  tokenizer: Tokenizer
  mesh: Any
  step: int


def load_run(workdir: str, step=None, mesh=None) -> LoadedRun:
  """A run's latest (or given) params restored straight into their sharded layout on `mesh`
  (default: all devices on the data axis), merged with LoRA adapters if the run trained adapters;
  the tokenizer is the one the run stored (train/run_tokenizer.py)."""
  config = load_config(workdir)
  mesh = mesh if mesh is not None else sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg)
  abstract, shardings, _, _ = params_lib.abstract_params(model, 8, mesh)
  with sharding.use_mesh(mesh):
    params, step = restore_params(workdir, abstract, shardings, step)
  return LoadedRun(config, model_cfg, model, params, run_tokenizer.load(workdir, config), mesh, step)


# ----------------------------------------------------------------------------- Hugging Face


def import_hf(source: str, workdir: str) -> str:
  """HF directory -> a Kiln run dir (checkpoints/0/params, config.json, hf_config.json, tokenizer/)
  that `init_from`, evaluation and sampling read. Returns the checkpoint directory."""
  local = files.local(source)
  hf = hf_config.read(local)
  config = base.base_config()
  config.model.update(hf_config.to_model(hf, os.path.join(source, "config.json")))
  if run_tokenizer.copy_hf_files(local, run_tokenizer.directory(workdir)):
    config.tokenizer.path = files.absolute(run_tokenizer.directory(workdir))
  mesh = sharding.make_mesh(config.mesh)
  model = Transformer(ModelConfig.from_config(config.model))
  abstract, shardings, _, _ = params_lib.abstract_params(model, 8, mesh)
  params = convert.load_hf(local, abstract, shardings)
  mngr = manager(workdir, keep=1, async_save=False)
  mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                       meta=ocp.args.JsonSave({"step": 0, "hf": files.absolute(source)})))
  mngr.wait_until_finished()
  mngr.close()
  save_config(workdir, config)
  save_hf_config(workdir, hf)
  return os.path.join(workdir, "checkpoints")


def export_hf(workdir: str, out_dir: str, max_shard_bytes: int = 2 << 30, dtype: str = "") -> list:
  """A Kiln run's latest params (LoRA adapters merged) -> HF directory; returns the shard files.

  The family and the other config.json entries come from the run's hf_config.json when it
  started from HF; otherwise qwen2 if the model has qkv bias, else llama. The run's tokenizer
  files are copied when it used a HF tokenizer (the stored ones; a run from before
  DIR/tokenizer/: those of its config.tokenizer.path). `dtype` ("bfloat16", ...) casts on the way out.
  """
  config = load_config(workdir)
  model = dict(config.model)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  abstract, shardings, _, _ = params_lib.abstract_params(Transformer(ModelConfig.from_config(config.model)), 8, mesh)
  params, _ = restore_params(workdir, abstract, shardings)
  params = {k: v for k, v in params.items() if k not in ("reward_head", "value_head")}
  tensors = convert.to_hf_tensors(jax.device_get(params), model)
  if dtype:
    tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
  out_dtype = str(next(iter(tensors.values())).dtype)
  hf = hf_config.from_model(model, read_hf_config(workdir), out_dtype)
  with tempfile.TemporaryDirectory() if files.is_url(out_dir) else contextlib.nullcontext(out_dir) as local:
    shards = convert.save_hf(tensors, hf, local, max_shard_bytes)
    if files.isdir(run_tokenizer.directory(workdir)):
      run_tokenizer.copy_hf_files(run_tokenizer.directory(workdir), local)
    elif config.tokenizer.path:
      run_tokenizer.copy_hf_files(os.path.expanduser(config.tokenizer.path), local)
    if local != out_dir:  # a gs:// out_dir: written here, then uploaded
      files.upload(local, out_dir)
  return shards


def convert_hf(workdir: str, config) -> None:
  """configs/tools.py `convert()`: imports config.import_hf into `workdir`, or exports `workdir`'s
  latest params to config.export_hf."""
  if bool(config.import_hf) == bool(config.export_hf):
    raise UserError("give exactly one of config.import_hf=HF_DIR (a new run in --workdir) or "
                    "config.export_hf=HF_DIR (--workdir's latest params)")
  if config.import_hf:
    print(f"wrote {import_hf(config.import_hf, workdir)} (use --config.init_from={workdir})")
  else:
    shards = export_hf(workdir, config.export_hf, int(config.max_shard_mb * 2**20), config.dtype)
    print(f"wrote {config.export_hf}: config.json, {convert.INDEX}, {len(shards)} safetensors shard(s)")


def main():
  """`python -m train.rundir --workdir DIR [--config.KEY=VALUE ...]`."""
  cli.run_on_workdir(convert_hf, tools.convert(), "The Kiln run directory to import into or export from.")


if __name__ == "__main__":
  main()
