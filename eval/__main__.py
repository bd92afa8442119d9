"""Evaluate one checkpoint on the suite and print its table row:

  python -m eval --workdir runs/demo/sft [--num_problems 200 --samples 4]
"""
import argparse
import json

from configs import sft_tiny
from eval import report, suite


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num_problems", type=int, default=200)
  ap.add_argument("--samples", type=int, default=4)
  ap.add_argument("--temperature", type=float, default=0.8)
  args = ap.parse_args()
  cfg = suite.default_eval_config()
  cfg.num_problems, cfg.samples, cfg.temperature = args.num_problems, args.samples, args.temperature
  from eval.checkpoints import load_config
  sft = sft_tiny.get_config()
  sft.data = load_config(args.workdir).data  # the run's own data source and cache
  sft.data.train_on_prompt = False
  row = suite.evaluate_run(args.workdir, cfg, sft)
  row.pop("examples")
  print(report.table({args.workdir: row}, suite.COLUMNS))
  print(json.dumps(row))


if __name__ == "__main__":
  main()
