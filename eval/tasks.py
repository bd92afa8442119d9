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


from configs import tools
from configs.errors import UserError
from model import sharding
from rl.accuracy import evaluate_problems
from train import cli, corpus, rundir

TASKS = {"arith": corpus.heldout_problems}


def evaluate_task(workdir: str, config) -> dict:
  """Asks `workdir`'s latest checkpoint config.num problems of config.task; prints and returns the
  numbers (configs/tools.py `tasks()`)."""
  if config.task not in TASKS:
    raise UserError(f"config.task={config.task!r}: use one of {' | '.join(sorted(TASKS))}")
  if config.chat not in ("auto", "yes", "no"):
    raise UserError(f"config.chat={config.chat!r}: use auto | yes | no")
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


def main():
  """`python -m eval.tasks --workdir DIR [--config.KEY=VALUE ...]`."""
  cli.run_on_workdir(evaluate_task, tools.tasks(), "The run to ask.")


if __name__ == "__main__":
  main()
