"""Accuracy on the held-out arithmetic and word problems, by generating answers.

  python -m eval.tasks --workdir runs/sft_tiny --task arith [--num 200] [--samples 4 --temperature 0.8]

Prints exact-match accuracy (greedy; and pass@k / mean sampled accuracy with --samples k),
format compliance (one well-formed <answer>N</answer>) and mean completion length. Chat-trained
runs are asked in their chat template; pretrained runs with the "Question: ...\\nAnswer:" prompt
their corpus used.
"""
import argparse
import json

from rl.accuracy import evaluate_problems
from train import corpus

TASKS = {"arith": corpus.heldout_problems}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--task", default="arith", choices=sorted(TASKS))
  ap.add_argument("--num", type=int, default=200, help="held-out problems to ask")
  ap.add_argument("--samples", type=int, default=0, help="k sampled answers per problem (pass@k)")
  ap.add_argument("--temperature", type=float, default=0.8)
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--max_new_tokens", type=int, default=80)
  ap.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
  args = ap.parse_args()
  from eval.checkpoints import load_run
  from model import sharding
  run = load_run(args.workdir)
  chat = run.config.objective != "pretrain" if args.chat == "auto" else args.chat == "yes"
  with sharding.use_mesh(run.mesh):
    res = evaluate_problems(run.params, run.model_cfg, run.tokenizer, TASKS[args.task](args.num),
                            chat=chat, mesh=run.mesh, samples=args.samples,
                            temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens,
                            template=run.config.data.chat_template)
  res.pop("completions")
  for ex in res.pop("examples"):
    print(f"Q: {ex['question']}\n   model: {ex['completion']!r}   (answer {ex['answer']})")
  print(json.dumps({"workdir": args.workdir, "step": run.step, "task": args.task, "num": args.num,
                    **{k: round(v, 4) for k, v in res.items()}}))


if __name__ == "__main__":
  main()
