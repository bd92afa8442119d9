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


def _no_carry(a, b, sign):
  """a +/- b column by column with every carry / borrow forgotten (float-free reference): each
  column's digit is (top +/- low) mod 10, the last column's whole sum is kept."""
  width, out = max(len(str(a)), len(str(b))), 0
  for i in range(width):
    top, low = a // 10 ** i % 10, b // 10 ** i % 10
    col = top + low if sign > 0 else (top - low) % 10
    out += (col if i == width - 1 else col % 10) * 10 ** i
  return out


def _sloppy_answer(question):
  """The sloppy demonstrator's answer to an addition / subtraction problem, from the question alone."""
  n = [int(x) for x in re.findall(r"\d+", question)]
  if question.startswith("What is") and "+" in question:
    return _no_carry(n[0], n[1], +1)
  if question.startswith("What is") and "-" in question:
    return _no_carry(n[0], n[1], -1)
  if " gives " in question:
    return _no_carry(_no_carry(n[0], n[1], -1), n[2], +1)
  if " holds " in question:  # A box holds k ... n full boxes and loose ...
    return _no_carry(n[1] * n[0], n[2], +1)
  if " costs $" in question:  # buys n1 f1 and n2 f2, each f2 costs p2, total: a quotient one too high
    return (n[3] - n[1] * n[2]) // n[0] + 1
  return n[0] * n[1] // n[2] + 1  # collects per_day for days, shares among people


CARRY = re.compile(r"\d \+ \d \+ 1 = |\d - 1 - \d")  # a column step with a carry / a borrow paid back
QUOTIENT = re.compile(r"\d / \d")  # a word problem's division


def test_sloppy_demonstrator():
  right = corpus.sft_conversations(7, 3000)
  sloppy = corpus.sft_conversations(7, 3000, slip=0.7)
  assert sloppy == corpus.sft_conversations(7, 3000, slip=0.7) != corpus.sft_conversations(8, 3000, slip=0.7)
  assert [c["messages"][0] for c in right] == [c["messages"][0] for c in sloppy]  # the same questions
  due = slipped = 0
  for r, s in zip(right, sloppy):
    question, good, bad = r["messages"][0]["content"], r["messages"][1]["content"], s["messages"][1]["content"]
    if not CARRY.search(good) and not QUOTIENT.search(good):  # no carry, borrow or quotient: nothing to slip
      assert good == bad
      continue
    due += 1
    if good == bad:
      continue
    slipped += 1
    assert not CARRY.search(bad)
    answer = re.fullmatch(r".* <answer>(\d+)</answer>", bad).group(1)
    assert int(answer) == _sloppy_answer(question), (question, bad)
    for step in bad.split(" <answer>")[0].split(". "):  # right arithmetic, or a whole sum done sloppily
      expr, value = step.rstrip(".").split(" = ")
      if eval(expr) != int(value):  # pylint: disable=eval-used
        x, op, y = expr.split()
        sloppy = eval(expr) + 1 if op == "/" else _no_carry(int(x), int(y), 1 if op == "+" else -1)  # pylint: disable=eval-used
        assert sloppy == int(value), step
  assert due > 700 and abs(slipped / due - 0.7) < 4 * np.sqrt(0.21 / due)
  assert corpus.heldout_problems(50) == corpus.heldout_problems(50)  # held-out stays right
  for p in corpus.heldout_problems(50) + corpus.train_problems(7, 200):
    _check_solution(p)
