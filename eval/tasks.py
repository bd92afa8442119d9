"""Accuracy on the held-out arithmetic and word problems, by generating answers.

  python -m eval.tasks --workdir runs/sft_tiny [--config.task=arith --config.num=200]
  python -m eval.tasks --workdir runs/sft_tiny --config.samples=4 --config.temperature=0.8

Options are configs/tools.py `tasks()`. Prints exact-match accuracy (greedy; and pass@k / mean
sampled accuracy with config.samples = k),
format compliance (one well-formed <answer>N</answer>) and mean completion length. Chat-trained
runs are asked in their chat template; pretrained runs with the "Question: ...\\nAnswer:" prompt
their corpus used.
"""
import json
import math

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from configs import tools

from model import decode, sharding
from rl import rewards
from train import corpus, rundir

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


def evaluate_task(workdir: str, config) -> dict:
  """Asks `workdir`'s latest checkpoint config.num problems of config.task; prints and returns the
  numbers (configs/tools.py `tasks()`)."""
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}: use one of {' | '.join(sorted(TASKS))}")
  if config.chat not in ("auto", "yes", "no"):
    raise ValueError(f"config.chat={config.chat!r}: use auto | yes | no")
  run = rundir.load_run(workdir)
  chat = run.config.objective != "pretrain" if config.chat == "auto" else config.chat == "yes"
  with sharding.use_mesh(run.mesh):
    res = evaluate_problems(run.params, run.model_cfg, run.tokenizer, TASKS[config.task](config.num),
                            chat=chat, mesh=run.mesh, samples=config.samples,
                            temperature=config.temperature, top_p=config.top_p,
                            max_new_tokens=config.max_new_tokens,
                            template=run.config.data.chat_template)
  res.pop("completions")
  for ex in res.pop("examples"):
    print(f"Q: {ex['question']}\n   model: {ex['completion']!r}   (answer {ex['answer']})")
  out = {"workdir": workdir, "step": run.step, "task": config.task, "num": config.num,
         **{k: round(v, 4) for k, v in res.items()}}
  print(json.dumps(out))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  evaluate_task(flags.FLAGS.workdir, flags.FLAGS.config)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The run to ask.")
  config_flags.DEFINE_config_dict("config", tools.tasks(), "Options: configs/tools.py tasks().")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
