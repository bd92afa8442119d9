"""Built-in corpus: correct arithmetic, a held-out split training never sees, offline English."""
import re

import numpy as np

from train import corpus


def _check_solution(p):
  """Every step `expr = value.` evaluates to value; the last value is the answer."""
  steps = [s for s in p.solution.split(". ") if s]
  value = None
  for step in steps:
    expr, value = step.rstrip(".").split(" = ")
    assert re.fullmatch(r"[0-9+\-*/ ]+", expr), step
    assert eval(expr) == int(value), (p.question, step)  # pylint: disable=eval-used
  assert value == p.answer


def test_solutions_are_right():
  rng = np.random.default_rng(0)
  problems = [corpus.make_problem(rng) for _ in range(500)]
  for p in problems:
    _check_solution(p)
  assert len({p.question.split()[0] for p in problems}) >= 5  # several templates


def test_worked_example_format():
  rng = np.random.default_rng(3)
  fruit = next(p for p in iter(lambda: corpus.make_problem(rng), None) if "costs $" in p.question)
  assert re.fullmatch(r"\d+ - \d+\*\d+ = \d+\. \d+ / \d+ = \d+\.", fruit.solution)
  assert corpus.format_completion(fruit) == f"{fruit.solution} <answer>{fruit.answer}</answer>"


def test_heldout_is_fixed_and_disjoint_from_training():
  held = corpus.heldout_problems(50)
  assert held == corpus.heldout_problems(50) and all(corpus.is_heldout(p) for p in held)
  questions = {p.question for p in held}
  for seed in (0, 1):
    train = corpus.train_problems(seed, 2000)
    assert not questions & {p.question for p in train}
    assert not any(corpus.is_heldout(p) for p in train)
  assert corpus.train_problems(0, 100) == corpus.train_problems(0, 100)


def test_english_text():
  paragraphs = corpus.english_text()
  assert len(paragraphs) > 100 and sum(map(len, paragraphs)) > 50_000
  assert all(p == p.strip() and "\n" not in p for p in paragraphs)


def test_documents_and_conversations():
  docs = corpus.pretrain_documents(0, 30)
  assert docs == corpus.pretrain_documents(0, 30)
  problems = [d for d in docs if d.startswith("Question: ")]
  assert len(problems) == 30 and all("\nAnswer: " in d and d.endswith("</answer>") for d in problems)
  conv = corpus.sft_conversations(0, 5)
  assert [m["role"] for m in conv[0]["messages"]] == ["user", "assistant"]
  p = corpus.train_problems(0, 5)[2]
  assert conv[2]["messages"][1]["content"] == corpus.format_completion(p)
