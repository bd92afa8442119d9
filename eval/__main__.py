"""Evaluate one checkpoint on the suite and print its table row:

  python -m eval --workdir runs/demo/grpo --config.reference=runs/demo/sft --config.reward_model=runs/demo/reward
  python -m eval --workdir runs/demo/reward          # a reward model: held-out pair accuracy

Options are configs/tools.py `evaluate()` (`--config.num_problems=200 --config.samples=4 ...`).
Without config.reference there is no KL and no win rate; without config.reward_model no reward and
no win rate. The held-out perplexity scores the conversations of the reference's saved config (the
SFT run's, as in the pipeline), else of the run's own.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from configs import tools
from eval import report, suite
from train import cpu_tuning, rundir


def evaluate(workdir: str, config) -> dict:
  """The suite's row of `workdir`, printed as a table and as JSON."""
  heldout = rundir.load_config(config.reference) if config.reference else None
  row = suite.evaluate_run(workdir, config, heldout, reference=config.reference,
                           reward_model=config.reward_model)
  print(report.table({workdir: row}, suite.COLUMNS))
  print(json.dumps({k: v for k, v in row.items() if k not in report.NOT_SAVED}))
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  evaluate(flags.FLAGS.workdir, flags.FLAGS.config)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The run to evaluate.")
  config_flags.DEFINE_config_dict("config", tools.evaluate(), "Options: configs/tools.py evaluate().")
  flags.mark_flags_as_required(["workdir"])
  cpu_tuning.apply()
  app.run(main)
