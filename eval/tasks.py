"""Accuracy on the held-out arithmetic and word problems, by generating answers.

  python -m eval.tasks --workdir runs/sft_tiny --task arith [--num 200] [--samples 4 --temperature 0.8]

Prints exact-match accuracy (greedy; and pass@k / mean sampled accuracy with --samples k),
format compliance (one well-formed <answer>N</answer>) and mean completion length. Chat-trained
runs are asked in their chat template; pretrained runs with the "Question: ...\\nAnswer:" prompt
their corpus used.
"""
import argparse
import json
import math

import jax
import numpy as np

from model import decode
from rl import rewards
from train import corpus, cpu_tuning

TASKS = {"arith": corpus.heldout_problems}


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def prompts_for(problems, chat: bool) -> list:
  return [p.question if chat else f"Question: {p.question}\nAnswer:" for p in problems]


def evaluate_problems(params, model_cfg, tokenizer, problems, *, chat: bool, mesh=None,
                      samples: int = 0, temperature: float = 1.0, top_p: float = 1.0,
                      max_new_tokens: int = 64, template: str = "chatml", seed: int = 0,
                      batch: int = 256) -> dict:
  """Greedy accuracy / format / length, plus pass@k and sampled accuracy when samples > 0.

  `batch` prompts per generate call (x samples rows): one call, one compiled program, for the
  usual few hundred problems."""
  answers = [p.answer for p in problems]
  prompts = prompts_for(problems, chat)

  def run(num, temp, key):
    out = []
    for i in range(0, len(prompts), batch):
      out += decode.generate_text(params, model_cfg, tokenizer, prompts[i:i + batch], chat,
                                  key=jax.random.fold_in(key, i), max_new_tokens=max_new_tokens,
                                  num_samples=num, temperature=temp, top_p=top_p,
                                  template=template, mesh=mesh)
    return out  # [problem][sample]

  greedy = [c[0] for c in run(1, 0.0, jax.random.key(seed))]
  result = {
      "accuracy": float(np.mean(rewards.answer_match(greedy, answers))),
      "format": float(np.mean(rewards.answer_tag_reward(greedy))),
      "length": float(np.mean([len(tokenizer.encode(c)) for c in greedy])),
      "completions": greedy,
      "examples": [{"question": p.question, "answer": p.answer, "completion": c}
                   for p, c in zip(problems[:3], greedy[:3])],
  }
  if samples > 0:
    sampled = run(samples, temperature, jax.random.key(seed + 1))
    correct = [int(np.sum(rewards.answer_match(s, [a] * samples))) for s, a in zip(sampled, answers)]
    result[f"pass@{samples}"] = float(np.mean([pass_at_k(samples, c, samples) for c in correct]))
    result["sampled_accuracy"] = float(np.mean(correct) / samples)
  return result


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
  cpu_tuning.apply()
  main()
