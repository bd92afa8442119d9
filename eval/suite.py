"""The evaluation suite: one row of numbers for one checkpoint, comparable across every stage.

Policies: held-out perplexity of answers (assistant tokens of the held-out conversations),
exact-match accuracy of generated answers (greedy, and sampled with pass@k), format compliance,
mean completion length; with a reward model, its mean score of the greedy answers (`reward`) and
the `win_rate` against the reference's greedy answers; with a reference, `kl` = KL(pi || ref) per
completion on held-out prompts. Reward models (and DPO's implicit reward): held-out
`pair_accuracy`. A metric that does not apply to a run is None ("-" in the table).
"""
import copy
import functools
import os

import jax

from eval import compare, preference
from model import sharding
from rl.accuracy import evaluate_problems
from rl.models import load_reward_model
from train import corpus, data, loop, objectives
from train.rundir import load_run

COLUMNS = ("perplexity", "accuracy", "pass@k", "sampled_accuracy", "format", "length", "reward",
           "win_rate", "kl", "pair_accuracy")


def heldout_config(config):
  """The config whose held-out conversations `answer_perplexity` scores: `config` (a run's saved
  config.json) as an SFT stage, loss on the assistant tokens only."""
  cfg = copy.deepcopy(config)
  cfg.objective = "sft"
  cfg.data.train_on_prompt = False
  return cfg


def answer_perplexity(run, heldout, max_batches: int = 8) -> float:
  """exp(mean NLL) of the assistant tokens of the held-out conversations of config `heldout`."""
  cfg = heldout_config(heldout)
  cfg.model = run.config.model
  batches = data.make_eval_batches(cfg, run.tokenizer, jax.process_index(), jax.process_count(),
                                   max_batches=None)
  fn = jax.jit(lambda p, b: objectives.next_token_loss(p, b, run.model))
  out = loop.evaluate(functools.partial(fn, run.params), list(batches)[:max_batches], run.mesh)
  return out["eval/perplexity"]


def greedy_completions(run, problems, max_new_tokens: int) -> list:
  """A run's greedy answers (the reference's, for the win rate)."""
  with sharding.use_mesh(run.mesh):
    res = evaluate_problems(run.params, run.model_cfg, run.tokenizer, problems,
                                  chat=run.config.objective != "pretrain", mesh=run.mesh,
                                  max_new_tokens=max_new_tokens, template=run.config.data.chat_template)
  return res["completions"]


def evaluate_run(workdir: str, eval_cfg, heldout=None, *, reference: str = "", reward_model: str = "",
                 reference_completions=None) -> dict:
  """The suite's row for the latest checkpoint of `workdir` (plus "completions", "examples", "step").

  eval_cfg: configs/sections.py `eval()`; heldout: the saved config (an SFT run's) whose held-out
  conversations give the perplexity (None = the run's own); reference: the run KL and win rate are
  measured against ('' = neither); reward_model: the judge of `reward` and `win_rate`;
  reference_completions: the reference's greedy answers if known."""
  run = load_run(workdir)
  row = dict.fromkeys(COLUMNS)
  row["step"] = run.step
  if run.config.objective in ("reward_model", "dpo"):
    row["pair_accuracy"] = preference.evaluate_pairs(workdir)["accuracy"]
    if run.config.objective == "reward_model":
      return row
  problems = corpus.heldout_problems(eval_cfg.num_problems)
  chat, template = run.config.objective != "pretrain", run.config.data.chat_template
  with sharding.use_mesh(run.mesh):
    row["perplexity"] = answer_perplexity(run, run.config if heldout is None else heldout,
                                          eval_cfg.perplexity_batches)
    res = evaluate_problems(
        run.params, run.model_cfg, run.tokenizer, problems, chat=chat, mesh=run.mesh,
        samples=eval_cfg.samples, temperature=eval_cfg.temperature,
        max_new_tokens=eval_cfg.max_new_tokens, template=template, seed=eval_cfg.seed)
  row.update({k: res[k] for k in ("accuracy", "format", "length", "completions", "examples")})
  if eval_cfg.samples:
    row["pass@k"], row["sampled_accuracy"] = res[f"pass@{eval_cfg.samples}"], res["sampled_accuracy"]
  is_reference = bool(reference) and os.path.realpath(reference) == os.path.realpath(workdir)
  questions = [p.question for p in problems]
  if reward_model:
    rm, rm_cfg = load_reward_model(reward_model, run.mesh)
    scores = compare.reward_scores(rm, rm_cfg, run.tokenizer, questions, row["completions"], template, run.mesh)
    row["reward"] = float(scores.mean())
    if reference and not is_reference:
      ref_answers = reference_completions or greedy_completions(load_run(reference), problems,
                                                                eval_cfg.max_new_tokens)
      ref_scores = compare.reward_scores(rm, rm_cfg, run.tokenizer, questions, ref_answers, template, run.mesh)
      row["win_rate"] = compare.win_rate(scores, ref_scores)
  if reference and chat and not is_reference:
    ref = load_run(reference)
    row["kl"] = compare.kl_to_reference(
        run.params, ref.params, run.model_cfg, run.tokenizer, problems, template, run.mesh,
        key=jax.random.key(eval_cfg.seed + 2), max_new_tokens=eval_cfg.max_new_tokens)
  return row
