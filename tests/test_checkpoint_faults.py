"""Faults done for real on a run's checkpoints: a truncated chunk, a missing manifest, flipped bytes,
a full disk. The run resumes from the newest step that restores (the bad one named, moved aside,
never deleted) with the losses of an uninterrupted run; a failed save stops the run within a step
naming the path and the last good checkpoint, and the checkpoints before it still restore."""
import glob
import json
import os
import random
import shutil
import subprocess

import jax
import numpy as np
import pytest

from configs import pretrain_tiny
from configs.errors import UserError
from model import sharding
from model.transformer import ModelConfig, Transformer
from train import checksums, loop, optim, rundir
from train.params import abstract_params
from tests import _cli

STEPS, EVERY = 20, 10


def _config(cache: str, **overrides):
  c = pretrain_tiny.get_config()
  c.data.cache_dir, c.data.num_documents = cache, 4000
  c.seq_len, c.batch_size, c.steps, c.eval_batches = 64, 16, STEPS, 2
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, EVERY
  c.update(overrides)
  return c


def _losses(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def straight(data_cache, tmp_path_factory):
  """(config, workdir) of an uninterrupted run: checkpoints at steps 10 and 20, with checksums."""
  config = _config(data_cache, async_checkpoints=False)
  workdir = str(tmp_path_factory.mktemp("faults") / "straight")
  loop.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  return config, workdir


def _copy(straight, tmp_path) -> str:
  """A copy of the straight run without its metrics (so only a resume's own steps are in them)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(straight[1], workdir)
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  return workdir


def _biggest_chunk(workdir: str, step: int) -> str:
  return max(glob.glob(os.path.join(workdir, "checkpoints", str(step), "params", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def truncate(workdir):
  path = _biggest_chunk(workdir, STEPS)
  os.truncate(path, os.path.getsize(path) // 3)
  return "truncated"


def drop_manifest(workdir):
  os.remove(os.path.join(workdir, "checkpoints", str(STEPS), "params", "manifest.ocdbt"))
  return "missing"


def flip_bytes(workdir):
  path = _biggest_chunk(workdir, STEPS)
  raw = bytearray(open(path, "rb").read())
  for i in random.Random(0).sample(range(len(raw)), 100):
    raw[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(raw)
  return "checksum"


def _restore_newest(config, workdir):
  """restore_newest on `workdir` as a resume does it: (step, params, note)."""
  mesh = sharding.make_mesh(config.mesh)
  model = Transformer(ModelConfig.from_config(config.model))
  abs_p, p_sh, _, boxed = abstract_params(model, config.seq_len, mesh)
  boxed_opt = jax.eval_shape(optim.make_optimizer(config.optim, config.steps)[0].init, boxed)
  mngr = rundir.manager(workdir, config.keep_checkpoints, async_save=False)
  with sharding.use_mesh(mesh):
    step, params, _, _, note = rundir.restore_newest(
        mngr, abs_p, p_sh, sharding.unbox(boxed_opt), sharding.tree_shardings(boxed_opt, mesh))
  mngr.close()
  return step, params, note


def _params_of(workdir, step, config):
  mesh = sharding.make_mesh(config.mesh)
  abs_p, p_sh, _, _ = abstract_params(Transformer(ModelConfig.from_config(config.model)), config.seq_len, mesh)
  with sharding.use_mesh(mesh):
    return rundir.restore_params(workdir, abs_p, p_sh, step)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_moved_aside(workdir, reason):
  moved = os.path.join(workdir, "checkpoints-corrupt", f"{STEPS}-{reason}")
  assert os.path.isfile(os.path.join(moved, "params", "_METADATA"))  # kept, not deleted


def test_truncated_chunk_resumes_from_the_step_before_with_the_same_losses(straight, tmp_path, capsys):
  config, _ = straight
  workdir = _copy(straight, tmp_path)
  truncate(workdir)
  loop.train(config, workdir)
  out = capsys.readouterr().out
  assert f"resumed from step {EVERY} (step {STEPS} truncated, moved to " in out, out
  _assert_moved_aside(workdir, "truncated")
  resumed, want = _losses(workdir), _losses(straight[1])
  assert sorted(resumed) == list(range(EVERY + 1, STEPS + 1))
  np.testing.assert_array_equal([resumed[s] for s in resumed], [want[s] for s in resumed])


@pytest.mark.parametrize("fault", [drop_manifest, flip_bytes])
def test_bad_newest_step_is_moved_aside_and_the_one_before_restores(straight, tmp_path, fault):
  config, _ = straight
  workdir = _copy(straight, tmp_path)
  reason = fault(workdir)
  step, params, note = _restore_newest(config, workdir)
  assert step == EVERY and f"step {STEPS} {reason}" in note, note
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(EVERY)]
  _assert_moved_aside(workdir, reason)
  _assert_same(params, _params_of(straight[1], EVERY, config)[0])


def test_unverified_step_that_does_not_restore_falls_back(straight, tmp_path):
  """A step saved before checksums existed: restored if it restores, else moved aside as unreadable."""
  config, _ = straight
  workdir = _copy(straight, tmp_path)
  for step in (EVERY, STEPS):
    os.remove(os.path.join(workdir, "checkpoints", str(step), checksums.FILE))
  truncate(workdir)
  step, params, note = _restore_newest(config, workdir)
  assert step == EVERY and f"step {STEPS} unreadable" in note and "not verified" in note, note
  _assert_moved_aside(workdir, "unreadable")
  _assert_same(params, _params_of(straight[1], EVERY, config)[0])


def test_init_from_a_run_with_a_bad_newest_step_takes_the_one_before(straight, tmp_path, capsys):
  config, _ = straight
  workdir = _copy(straight, tmp_path)
  flip_bytes(workdir)
  params, step = _params_of(workdir, None, config)
  assert step == EVERY and rundir.latest_step(workdir) == EVERY
  assert f"step {STEPS}: params/" in capsys.readouterr().err
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(EVERY), str(STEPS)]  # not moved
  _assert_same(params, _params_of(straight[1], EVERY, config)[0])


def test_no_step_restores_is_an_error_not_a_fresh_start(straight, tmp_path):
  config, _ = straight
  workdir = _copy(straight, tmp_path)
  for step in (EVERY, STEPS):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "params", "manifest.ocdbt"))
  with pytest.raises(UserError, match=f"no checkpoint in .*checkpoints restores .step {STEPS}: "):
    _restore_newest(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints-corrupt"))) == [f"{EVERY}-missing", f"{STEPS}-missing"]


@pytest.fixture
def small_disk(tmp_path):
  """A 3 MB tmpfs (room for one checkpoint of the tiny model, not two); root only."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's event loop, after the failure
def test_full_disk_stops_within_a_step_and_keeps_the_earlier_checkpoint(straight, small_disk, tmp_path):
  config, _ = straight
  workdir = str(small_disk / "run")
  with pytest.raises(UserError) as err:
    loop.train(_config(config.data.cache_dir, async_checkpoints=True), workdir)
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f"saving checkpoint {workdir}/checkpoints/{STEPS} failed: No space left on device"), message
  assert message.endswith(f"the last good checkpoint is step {EVERY} in {workdir}/checkpoints")
  assert max(_losses(workdir)) <= STEPS + 1  # noticed at the step after the save at the latest
  kept = str(tmp_path / "kept")
  shutil.copytree(workdir, kept, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
  step, params, note = _restore_newest(config, kept)
  assert step == EVERY and note == ""
  _assert_same(params, _params_of(straight[1], EVERY, config)[0])


@pytest.mark.slow
@pytest.mark.parametrize("fault", [drop_manifest, flip_bytes])
def test_every_fault_resumes_with_the_losses_of_an_uninterrupted_run(straight, tmp_path, fault):
  config, _ = straight
  workdir = _copy(straight, tmp_path)
  reason = fault(workdir)
  loop.train(config, workdir)
  _assert_moved_aside(workdir, reason)
  resumed, want = _losses(workdir), _losses(straight[1])
  assert sorted(resumed) == list(range(EVERY + 1, STEPS + 1))
  np.testing.assert_array_equal([resumed[s] for s in resumed], [want[s] for s in resumed])


def _two_processes(workdir: str, cache: str) -> list:
  """Runs the tiny pretraining in `workdir` as two processes (6 steps, checkpoints at 3 and 6)."""
  port = _cli.free_port()
  procs = [subprocess.Popen(
      _cli.command(workdir, cache, "--config.steps=6", "--config.log_every=1", "--config.checkpoint_every=3",
                   "--config.eval_every=0", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}"),
      env=_cli.env(2), cwd=_cli.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


@pytest.mark.slow
def test_two_processes_agree_on_the_step_to_resume(data_cache, tmp_path):
  """Process 0 checks the checksums and moves the bad step aside; both resume from the one before."""
  workdir = str(tmp_path / "multi")
  _two_processes(workdir, data_cache)
  want = _losses(workdir)
  path = max(glob.glob(os.path.join(workdir, "checkpoints", "6", "params", "ocdbt.process_*", "d", "*")),
             key=os.path.getsize)
  os.truncate(path, 100)
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  outs = _two_processes(workdir, data_cache)
  assert "resumed from step 3 (step 6 truncated, moved to " in outs[0]
  assert os.path.isdir(os.path.join(workdir, "checkpoints-corrupt", "6-truncated"))
  resumed = _losses(workdir)
  assert sorted(resumed) == [4, 5, 6]
  np.testing.assert_allclose([resumed[s] for s in resumed], [want[s] for s in resumed], rtol=1e-6)
