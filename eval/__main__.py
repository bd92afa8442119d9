"""Evaluate one checkpoint on the suite and print its table row:

  python -m eval --workdir runs/demo/grpo --reference runs/demo/sft --reward_model runs/demo/reward
  python -m eval --workdir runs/demo/reward          # a reward model: held-out pair accuracy

Without --reference there is no KL and no win rate; without --reward_model no reward and no win rate.
"""
import argparse
import json

from configs import sft_tiny
from eval import report, suite
from train import cpu_tuning


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--reference", default="", help="run to measure KL and win rate against (the SFT run)")
  ap.add_argument("--reward_model", default="", help="reward_model run that judges reward and win rate")
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
  row = suite.evaluate_run(args.workdir, cfg, sft, reference=args.reference, reward_model=args.reward_model)
  print(report.table({args.workdir: row}, suite.COLUMNS))
  print(json.dumps({k: v for k, v in row.items() if k not in report.NOT_SAVED}))


if __name__ == "__main__":
  cpu_tuning.apply()
  main()
