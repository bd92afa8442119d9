"""String-level reward functions for verifiable tasks. Each returns np.float32 [N].

The project's standard completion format is "step by step text <answer>N</answer>".
docs/algorithms.md worked examples: "What is 2+2?" any completion whose final answer is 4
scores 1 (answer_match); a format reward for <reasoning>...</reasoning> <answer>...</answer>
gives both 1.0, one 0.5, none 0 (format_reward); a shaped numeric reward for target 4
gives 4 -> 1, within +-1 partial, 6 -> 0 (numeric_closeness).
"""
from __future__ import annotations

import math
import re

import numpy as np

from configs.errors import unknown

_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_REASONING = re.compile(r"<reasoning>.*?</reasoning>", re.DOTALL)
_NUMBER_ONLY = re.compile(r"\s*\$?" + _NUMBER.pattern + r"\s*")


def extract_answer(text):
  """Final answer of a completion: the content of the last <answer>X</answer> (stripped)
  if there is one, else the last number in the text, else None."""
  tagged = _ANSWER.findall(text)
  if tagged:
    return tagged[-1].strip()
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def _to_number(s):
  """'4', '4.0', '1,000', '$3', 'x = 4' -> float (the whole string, else its last number)."""
  if s is None:
    return None
  s = str(s).strip().replace(",", "").lstrip("$")
  try:
    value = float(s)
    return value if math.isfinite(value) else None
  except ValueError:
    numbers = _NUMBER.findall(s)
    return float(numbers[-1]) if numbers else None


def _same_answer(pred, answer):
  a, b = _to_number(pred), _to_number(answer)
  if a is not None and b is not None:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
  return pred is not None and str(pred).strip().lower() == str(answer).strip().lower()


def answer_match(completions, answers):
  """1 where the extracted answer equals the reference (numerically if both parse:
  "4" == "4.0"; else case-insensitive string equality), 0 otherwise."""
  return np.array([float(_same_answer(extract_answer(c), a))
                   for c, a in zip(completions, answers, strict=True)], np.float32)


def format_reward(completions):
  """<reasoning>...</reasoning> and <answer>...</answer>: both 1.0, one 0.5, none 0."""
  return np.array([0.5 * bool(_REASONING.search(c)) + 0.5 * bool(_ANSWER.search(c))
                   for c in completions], np.float32)


def answer_tag_reward(completions):
  """1 if the completion has exactly one well-formed <answer>number</answer>, else 0."""
  def ok(c):
    tags = _ANSWER.findall(c)
    return (len(tags) == 1 and c.count("<answer>") == 1 and c.count("</answer>") == 1
            and _NUMBER_ONLY.fullmatch(tags[0]) is not None)
  return np.array([float(ok(c)) for c in completions], np.float32)


def numeric_closeness(completions, answers, width=1.0):
  """Linear ramp max(0, 1 - |pred - target| / (2 * width)); unparseable -> 0.

  With width 1 and target 4: 4 -> 1, 4.5 -> 0.75, 3 or 5 -> 0.5, 6 or beyond -> 0.
  """
  out = []
  for c, a in zip(completions, answers, strict=True):
    pred, target = _to_number(extract_answer(c)), _to_number(a)
    if pred is None or target is None:
      out.append(0.0)
    else:
      out.append(max(0.0, 1.0 - abs(pred - target) / (2.0 * width)))
  return np.array(out, np.float32)


def length_penalty(lengths, max_len, soft_cache):
  """DAPO soft overlong penalty: 0 for L <= max_len - cache, then linear down to -1 at
  L = max_len, -1 beyond. lengths [N] (completion token counts)."""
  lengths = np.asarray(lengths, np.float64)
  start = max_len - soft_cache
  ramp = (start - lengths) / max(soft_cache, 1)
  return np.clip(np.where(lengths <= start, 0.0, ramp), -1.0, 0.0).astype(np.float32)


def _length(completions, answers, lengths, max_len):
  if lengths is None or max_len is None:
    raise ValueError("length_penalty needs lengths and max_len")
  return length_penalty(lengths, max_len, max(1, max_len // 5))  # DAPO: cache = max_len / 5


# Uniform signature fn(completions, answers, lengths, max_len) -> np.float32 [N].
REWARD_FUNCTIONS = {
    "answer_match": lambda c, a, lengths, max_len: answer_match(c, a),
    "format": lambda c, a, lengths, max_len: format_reward(c),
    "answer_tag": lambda c, a, lengths, max_len: answer_tag_reward(c),
    "numeric_closeness": lambda c, a, lengths, max_len: numeric_closeness(c, a),
    "length_penalty": _length,
}


def combined_reward(names_and_weights, completions, answers, lengths=None, max_len=None):
  """Weighted sum of registered rewards. names_and_weights: {name: weight}.

  Returns (total np.float32 [N], {name: unweighted np.float32 [N]}).
  """
  per_function = {}
  total = np.zeros(len(completions), np.float32)
  for name, weight in names_and_weights.items():
    if name not in REWARD_FUNCTIONS:
      raise unknown(f"config.rl.rewards.{name}", name, REWARD_FUNCTIONS, "config.rl.rewards.", "reward function")
    per_function[name] = REWARD_FUNCTIONS[name](completions, answers, lengths, max_len)
    total = total + np.float32(weight) * per_function[name]
  return total.astype(np.float32), per_function
