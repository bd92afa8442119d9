"""Evaluate one checkpoint on the suite and print its table row:

  python -m eval --workdir runs/demo/grpo --config.reference=runs/demo/sft --config.reward_model=runs/demo/reward
  python -m eval --workdir runs/demo/reward          # a reward model: held-out pair accuracy

Options are configs/tools.py `evaluate()` (`--config.num_problems=200 --config.samples=4 ...`).
Without config.reference there is no KL and no win rate; without config.reward_model no reward and
no win rate. The held-out perplexity scores the conversations of the reference's saved config (the
SFT run's, as in the pipeline), else of the run's own.
"""
import json


from configs import tools
from eval import report, suite
from train import cli, rundir


def evaluate(workdir: str, config) -> dict:
  """The suite's row of `workdir`, printed as a table and as JSON."""
  heldout = rundir.load_config(config.reference) if config.reference else None
  row = suite.evaluate_run(workdir, config, heldout, reference=config.reference,
                           reward_model=config.reward_model)
  print(report.table({workdir: row}, suite.COLUMNS))
  print(json.dumps({k: v for k, v in row.items() if k not in report.NOT_SAVED}))
  return row


def main():
  """`python -m eval --workdir DIR [--config.KEY=VALUE ...]`."""
  cli.run_on_workdir(evaluate, tools.evaluate(), "The run to evaluate.")


if __name__ == "__main__":
  main()
