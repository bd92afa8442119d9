"""Every entry point has one command-line style: absl flags, `--workdir DIR` and `--config.KEY=VALUE`
(ml_collections config_flags). Flags are defined only when a module runs as a program, so the
modules import together (the pipeline imports the evaluation modules)."""
import importlib
import os
import sys

from tests import _cli
from train import rundir

ENTRY_POINTS = ("train.__main__", "train.pipeline", "train.rundir", "eval.__main__", "eval.sample",
                "eval.tasks", "eval.preference")


def test_entry_points_import_together_without_defining_flags():
  from absl import flags
  before = set(flags.FLAGS)
  modules = [importlib.import_module(name) for name in ENTRY_POINTS if name != "train.__main__"]
  assert all(callable(m.main) for m in modules)
  defined = set(flags.FLAGS) - before  # libraries (absl, grain) define flags of their own at import
  assert not defined & {"workdir", "config", "coordinator", "num_processes", "process_id"}, defined


def test_an_unknown_option_names_the_key(tmp_path):
  out = _cli.run([sys.executable, "-m", "eval.sample", "--workdir", str(tmp_path), "--config.tempreature=0.5"],
                 timeout=300)
  assert out.returncode != 0
  assert "tempreature" in out.stderr


def test_a_second_run_in_a_busy_workdir_stops_in_one_line(tmp_path, data_cache):
  """While a process trains in a workdir (here: this one, holding its lock), `python -m train` there
  stops before writing anything, with one line naming the holder; once released, it runs."""
  workdir = str(tmp_path / "run")
  cmd = _cli.command(workdir, data_cache, "--config.steps=2", "--config.checkpoint_every=2")
  with rundir.locked(workdir):
    out = _cli.run(cmd, timeout=300)
  assert out.returncode != 0
  assert f"pid {os.getpid()}" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  out = _cli.run(cmd, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "finished at step 2" in out.stdout
