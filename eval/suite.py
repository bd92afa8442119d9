"""The evaluation suite: one row of numbers for one checkpoint.

Held-out perplexity of answers (assistant tokens of the held-out conversations), exact-match
accuracy of generated answers (greedy, and sampled with pass@k), format compliance and mean
completion length — comparable across every stage of the pipeline.
"""
import copy
import functools

import jax

from eval import tasks
from eval.checkpoints import load_run
from model import sharding
from train import data, loop, objectives
from train import corpus

COLUMNS = ("perplexity", "accuracy", "pass@k", "sampled_accuracy", "format", "length")


def default_eval_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(
      num_problems=200,     # held-out problems asked
      samples=4,            # sampled answers per problem for pass@k (0 = greedy only)
      temperature=0.8,
      max_new_tokens=48,
      perplexity_batches=8,
      skip_objectives=["reward_model"],  # stages that are not policies
  ))


def answer_perplexity(run, sft_config, max_batches: int = 8) -> float:
  """exp(mean NLL) of the assistant tokens of the held-out conversations."""
  cfg = copy.deepcopy(sft_config)
  cfg.model = run.config.model
  batches = data.make_eval_batches(cfg, run.tokenizer, jax.process_index(), jax.process_count(),
                                   max_batches=None)
  fn = jax.jit(lambda p, b: objectives.next_token_loss(p, b, run.model))
  out = loop.evaluate(functools.partial(fn, run.params), list(batches)[:max_batches], run.mesh)
  return out["eval/perplexity"]


def evaluate_run(workdir: str, eval_cfg, sft_config) -> dict:
  """The suite's row for the latest checkpoint of `workdir`."""
  run = load_run(workdir)
  chat = run.config.objective != "pretrain"
  with sharding.use_mesh(run.mesh):
    row = {"perplexity": answer_perplexity(run, sft_config, eval_cfg.perplexity_batches)}
    res = tasks.evaluate_problems(
        run.params, run.model_cfg, run.tokenizer, corpus.heldout_problems(eval_cfg.num_problems),
        chat=chat, mesh=run.mesh, samples=eval_cfg.samples, temperature=eval_cfg.temperature,
        max_new_tokens=eval_cfg.max_new_tokens, template=run.config.data.chat_template)
  row.update({k: v for k, v in res.items() if k != "examples"})
  if eval_cfg.samples:
    row["pass@k"] = row.pop(f"pass@{eval_cfg.samples}")
  row["examples"] = res["examples"]
  row["step"] = run.step
  return row
