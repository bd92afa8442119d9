"""The command line of every tool that acts on one run directory: `--workdir DIR --config.KEY=VALUE`.

The options are a ConfigDict of configs/tools.py (ml_collections config_flags), so a tool takes
overrides exactly as `python -m train` does, and an unknown key stops it with the key's name.
"""
from typing import Callable

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from train import cpu_tuning


def run_on_workdir(action: Callable, options: ml_collections.ConfigDict, workdir_help: str) -> None:
  """Defines --workdir and --config (defaults: `options`), applies the CPU settings, then runs
  action(workdir, config). Flags are defined here, when a tool runs, never at import."""
  flags.DEFINE_string("workdir", None, workdir_help)
  config_flags.DEFINE_config_dict("config", options, "Options (configs/tools.py): --config.KEY=VALUE.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    action(flags.FLAGS.workdir, flags.FLAGS.config)

  cpu_tuning.apply()
  app.run(main)
