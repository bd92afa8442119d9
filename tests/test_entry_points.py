"""Every entry point has one command-line style: absl flags, `--workdir DIR` and `--config.KEY=VALUE`
(ml_collections config_flags). Flags are defined only when a module runs as a program, so the
modules import together (the pipeline imports the evaluation modules)."""
import importlib
import sys

from tests import _cli

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
