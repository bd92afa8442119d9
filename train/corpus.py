"""Built-in data that needs no download: arithmetic word problems and English prose.

Problems are small-number arithmetic (add / sub / mul) and two-step word problems whose
solution is written step by step, e.g.

    question: Emily buys 3 apples and 2 oranges. Each orange costs $2. The total cost is
              $13. What is the cost of each apple?
    solution: 13 - 2*2 = 9. 9 / 3 = 3.
    answer:   3

Additions and subtractions are worked column by column, ones first, so a small model can learn
them (each step is a one-digit fact; the result is assembled from the steps):

    question: What is 49 + 84?
    solution: 9 + 4 = 13. 4 + 8 + 1 = 13. 49 + 84 = 133.      (+ 1: the carry)
    question: What is 97 - 28?
    solution: 17 - 8 = 9. 9 - 1 - 2 = 6. 97 - 28 = 69.        (17: borrowed ten; - 1: the borrow)

Every step of a solution is `<expression> = <value>.`; the value of the last step is the
answer. The whole project formats a completion as `f"{solution} <answer>{answer}</answer>"`.

A problem is held out iff sha1(question) % 10 == 0: training never sees those, and
`heldout_problems(n)` is the same list whatever the seed.

English text comes from the Python installation itself (the language reference topics
that `pydoc` ships and stdlib module docstrings), so it is always available offline.
"""
import ast
import dataclasses
import hashlib
import os
import re
import sysconfig

import numpy as np

HELDOUT_SEED = 1234567
SLIP_STREAM = 5119  # the entropy word of the sloppy demonstrator's coin, after the corpus seed
NAMES = ("Emily", "Tom", "Sara", "Liam", "Mia", "Noah", "Ava", "Omar", "Priya", "Ken",
         "Lucia", "Ben", "Zoe", "Ivan", "Nora", "Sam")
FRUITS = ("apples", "oranges", "pears", "bananas", "lemons", "kiwis", "plums", "mangos")
THINGS = ("marbles", "stickers", "cards", "books", "pencils", "shells", "coins", "stamps")
CONTAINERS = ("box", "bag", "jar", "basket", "crate", "tray")
STDLIB_DOC_MODULES = ("argparse", "collections/__init__", "functools", "heapq", "bisect",
                      "textwrap", "difflib", "random", "statistics", "fractions", "string",
                      "tokenize", "contextlib", "dataclasses", "typing", "abc", "csv",
                      "json/__init__", "logging/__init__", "unittest/__init__", "pdb",
                      "pickle", "shutil", "subprocess", "threading", "zipfile/__init__")


@dataclasses.dataclass(frozen=True)
class Problem:
  """A question, its step-by-step solution and the final number (as text)."""
  question: str
  solution: str
  answer: str


def format_completion(p: Problem) -> str:
  """The project-wide completion format: reasoning then `<answer>N</answer>`."""
  return f"{p.solution} <answer>{p.answer}</answer>"


def _int(rng, lo, hi):
  """An int uniform in [lo, hi]."""
  return int(rng.integers(lo, hi + 1))


def _pick(rng, options):
  return options[int(rng.integers(len(options)))]


def _digit(x: int, i: int) -> int:
  return x // 10 ** i % 10


def _columns(a: int, b: int) -> int:
  return max(len(str(a)), len(str(b)))


def _assemble(values: list[int]) -> int:
  """The number the column steps spell: each step's last digit, the last step's whole value."""
  return sum((v if i == len(values) - 1 else v % 10) * 10 ** i for i, v in enumerate(values))


def column_add(a: int, b: int, slip: bool = False) -> tuple[str, int]:
  """(a + b worked by columns, ones first, its result); the last step is `a + b = sum.`

  slip: the sloppy demonstrator's rule, every carry forgotten (`4 + 8 = 12.` where `4 + 8 + 1 =
  13.` is right), so the result is the number its steps spell (49 + 84 = 123).
  """
  steps, values, carry = [], [], 0
  for i in range(_columns(a, b)):
    total = _digit(a, i) + _digit(b, i) + carry
    steps.append(f"{_digit(a, i)} + {_digit(b, i)}{' + 1' if carry else ''} = {total}.")
    values.append(total)
    carry = 0 if slip else total // 10
  result = _assemble(values)
  return " ".join(steps + [f"{a} + {b} = {result}."]), result


def column_sub(a: int, b: int, slip: bool = False) -> tuple[str, int]:
  """(a - b (a >= b) worked by columns, ones first, borrowing a ten where the top digit is short,
  its result). slip: every borrow is taken and never paid back (`9 - 2 = 7.` where `9 - 1 - 2 =
  6.` is right: 97 - 28 = 79)."""
  steps, values, borrow = [], [], 0
  for i in range(_columns(a, b)):
    top, low = _digit(a, i), _digit(b, i)
    ten = 10 if top - borrow < low else 0
    steps.append(f"{top + ten}{' - 1' if borrow else ''} - {low} = {top + ten - borrow - low}.")
    values.append(top + ten - borrow - low)
    borrow = 0 if slip else ten // 10
  result = _assemble(values)
  return " ".join(steps + [f"{a} - {b} = {result}."]), result


def _add(rng, slip=False):
  a, b = _int(rng, 1, 99), _int(rng, 1, 99)
  solution, result = column_add(a, b, slip)
  return Problem(f"What is {a} + {b}?", solution, str(result))


def _sub(rng, slip=False):
  a, b = sorted((_int(rng, 1, 99), _int(rng, 1, 99)), reverse=True)
  solution, result = column_sub(a, b, slip)
  return Problem(f"What is {a} - {b}?", solution, str(result))


def _mul(rng, slip=False):  # pylint: disable=unused-argument
  a, b = _int(rng, 2, 12), _int(rng, 2, 12)
  return Problem(f"What is {a} * {b}?", f"{a} * {b} = {a * b}.", str(a * b))


def _fruit_cost(rng, slip=False):
  """Two fruits, one unit price given, total given: find the other unit price."""
  name = _pick(rng, NAMES)
  f1, f2 = (FRUITS[int(i)] for i in rng.permutation(len(FRUITS))[:2])
  n1, n2, p1, p2 = _int(rng, 2, 9), _int(rng, 1, 9), _int(rng, 1, 9), _int(rng, 1, 9)
  total, rest = n1 * p1 + n2 * p2, n1 * p1
  q = (f"{name} buys {n1} {f1} and {n2} {f2}. Each {f2[:-1]} costs ${p2}. "
       f"The total cost is ${total}. What is the cost of each {f1[:-1]}?")
  return Problem(q, f"{total} - {n2}*{p2} = {rest}. {rest} / {n1} = {p1 + slip}.", str(p1 + slip))


def _give_and_get(rng, slip=False):
  """Start with a, give away b, get c more."""
  name, thing = _pick(rng, NAMES), _pick(rng, THINGS)
  a, b, c = _int(rng, 10, 60), _int(rng, 1, 9), _int(rng, 1, 30)
  q = (f"{name} has {a} {thing}. {name} gives {b} to a friend and then finds {c} more. "
       f"How many {thing} does {name} have now?")
  sub, left = column_sub(a, b, slip)
  add, result = column_add(left, c, slip)
  return Problem(q, f"{sub} {add}", str(result))


def _containers(rng, slip=False):
  """n containers of k things each, plus some loose ones."""
  thing, box = _pick(rng, THINGS), _pick(rng, CONTAINERS)
  n, k, loose = _int(rng, 2, 9), _int(rng, 2, 12), _int(rng, 2, 20)
  boxes = box + ("es" if box.endswith("x") else "s")
  q = (f"A {box} holds {k} {thing}. There are {n} full {boxes} and {loose} loose {thing}. "
       f"How many {thing} are there in total?")
  add, result = column_add(n * k, loose, slip)
  return Problem(q, f"{n}*{k} = {n * k}. {add}", str(result))


def _share(rng, slip=False):
  """Collect per day for some days, then share equally."""
  name, thing = _pick(rng, NAMES), _pick(rng, THINGS)
  per_day, days, people = _int(rng, 2, 9), _int(rng, 2, 6), _int(rng, 2, 4)
  total = per_day * days * people
  days_total = total // per_day
  q = (f"{name} collects {per_day} {thing} every day for {days_total} days and shares them "
       f"equally among {people} friends. How many {thing} does each friend get?")
  each = total // people + slip
  return Problem(q, f"{per_day}*{days_total} = {total}. {total} / {people} = {each}.", str(each))


TEMPLATES = (_add, _sub, _mul, _fruit_cost, _give_and_get, _containers, _share)


def make_problem(rng: np.random.Generator, slip: bool = False) -> Problem:
  """One random problem from one of the templates; slip: solved by the sloppy demonstrator, whose
  additions and subtractions forget every carry and borrow and whose word problems' quotients come
  out one too high (`12 / 3 = 5.`); the answer is its last step's value."""
  return _pick(rng, TEMPLATES)(rng, slip)


def is_heldout(p: Problem) -> bool:
  """True for the ~10% of problems training must never see (stable across runs)."""
  return int(hashlib.sha1(p.question.encode()).hexdigest(), 16) % 10 == 0


def _problems(seed, n: int, heldout: bool, slip: float = 0.0) -> list[Problem]:
  rng = np.random.default_rng(seed)
  seeds = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
  sloppy = np.random.default_rng(seeds + (SLIP_STREAM,))  # its own stream: the questions stay the same
  out = []
  while len(out) < n:
    p = make_problem(rng, bool(sloppy.random() < slip))
    if is_heldout(p) == heldout:
      out.append(p)
  return out


def train_problems(seed, n: int) -> list[Problem]:
  """n problems for training (never held-out ones); seed: an int or a tuple of ints (numpy's
  default_rng entropy)."""
  return _problems(seed, n, heldout=False)


def heldout_problems(n: int) -> list[Problem]:
  """The first n held-out problems: the same list for every run and every seed."""
  return _problems(HELDOUT_SEED, n, heldout=True)


def _prose(paragraph: str) -> str | None:
  """The paragraph as one line if it reads like English prose, else None."""
  lines = paragraph.strip("\n").split("\n")
  if not lines or any(l[:1].isspace() for l in lines) or set(lines[-1]) <= set("*=-~^"):
    return None
  text = " ".join(l.strip() for l in lines)
  letters = sum(c.isalpha() or c == " " for c in text)
  if len(text) < 80 or letters < 0.85 * len(text) or text[-1:] not in ".:)\"'":
    return None
  return re.sub(r" +", " ", text)


def english_text() -> list[str]:
  """English paragraphs that ship with Python (pydoc topics + stdlib docstrings), in a fixed order."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  sources = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
  stdlib = sysconfig.get_paths()["stdlib"]
  for mod in STDLIB_DOC_MODULES:
    path = os.path.join(stdlib, mod + ".py")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        sources.append(ast.get_docstring(ast.parse(f.read())) or "")
  paragraphs = (_prose(p) for s in sources for p in re.split(r"\n\s*\n", s))
  return [p for p in paragraphs if p]


def problem_text(p: Problem) -> str:
  """A problem as a plain-text pretraining document."""
  return f"Question: {p.question}\nAnswer: {format_completion(p)}"


def pretrain_documents(seed: int, n_problems: int) -> list[str]:
  """English paragraphs and n_problems training problems as text, shuffled by seed."""
  docs = english_text() + [problem_text(p) for p in train_problems(seed, n_problems)]
  order = np.random.default_rng(seed).permutation(len(docs))
  return [docs[i] for i in order]


def conversation(p: Problem) -> dict:
  """A problem as a one-turn chat: user asks, assistant answers in completion format."""
  return {"messages": [{"role": "user", "content": p.question},
                       {"role": "assistant", "content": format_completion(p)}]}


def sft_conversations(seed: int, n: int, slip: float = 0.0) -> list[dict]:
  """n training problems as chat records {"messages": [user, assistant]}; each solved, with
  probability slip, by the sloppy demonstrator (`make_problem`): the same questions, and where a
  carry or borrow was due, a wrong answer (49 + 84 = 123, 97 - 28 = 79)."""
  return [conversation(p) for p in _problems(seed, n, heldout=False, slip=slip)]
