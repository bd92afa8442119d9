"""Prompts of the online RL stages: where they come from, and how a batch of them is tokenized.

- "builtin": fresh problems every iteration, `corpus.train_problems((seed, iteration, STREAM), n)`
  (a seed tuple: runs of seeds s and s + 1 share no iteration's prompts, nor the SFT corpus's stream,
  `train_problems(0, n)`); the held-out set is `corpus.heldout_problems(n)` (fixed). State = the
  iteration: nothing to replay.
- "jsonl" | "parquet" | "hf_disk": the records of `rl.prompts_path` (a glob; train/formats.py),
  `{"prompt": str}`, `{"messages": [...]}` or TRL's `{"prompt": [...]}` (a conversation not ending
  with an assistant turn), with an optional `"answer"`; read in an endless per-epoch shuffle (seed
  config.seed). State = prompts consumed. Errors name file:line (file:row i). `rl.eval_path` is read
  in the same format (jsonl when the prompts are builtin).

A prompt is rendered with `data.chat_template` and its generation prompt, then left-padded to
`rl.max_prompt_len`. A file's prompt longer than that is dropped at start (`data.overlong` "drop")
or cut from the left ("truncate", so the generation prompt survives), and counted (`describe`,
`warning`). A built-in problem is cut, uncounted (1 in 5,000 passes 64 tokens, by one).
"""
import dataclasses
from typing import Optional

import numpy as np

from configs.errors import UserError
from model import tokenizer as tokenizer_lib
from model.decode import left_pad
from rl import config as rl_config
from train import corpus, formats, sources


STREAM = 1  # last entry of the built-in prompts' seed tuple: numpy reads (0, 0) as 0, (0, 0, 1) not


@dataclasses.dataclass(frozen=True)
class Prompt:
  messages: tuple            # ({"role", "content"}, ...), ending with a user/system turn
  answer: Optional[str] = None


def from_problem(p: corpus.Problem) -> Prompt:
  return Prompt(({"role": "user", "content": p.question},), p.answer)


def parse_record(rec, where: str) -> Prompt:
  """A JSON record -> Prompt; UserError names `where` (file:line)."""
  bad = lambda msg: UserError(f"{where}: {msg}")
  if not isinstance(rec, dict):
    raise bad(f"expected a JSON object, got {type(rec).__name__}")
  if ("prompt" in rec) == ("messages" in rec):
    raise bad("needs exactly one of 'prompt' (a string or a list of messages) or 'messages' (a list)")
  key = "prompt" if "prompt" in rec else "messages"
  if isinstance(rec[key], str) and key == "prompt":
    messages = ({"role": "user", "content": rec["prompt"]},)
  elif isinstance(rec[key], list):
    messages = tuple(formats.messages(rec[key], where, key))
    if messages[-1]["role"] == "assistant":
      raise bad(f"{key!r} is the prompt: it must not end with an assistant turn")
  else:
    raise bad(f"{key!r} must be {'a string or ' * (key == 'prompt')}a list of messages")
  answer = rec.get("answer")
  if answer is not None and not isinstance(answer, (str, int, float)):
    raise bad("'answer' must be a string or a number")
  return Prompt(messages, None if answer is None else str(answer))


def read(path: str, need_answer: bool = False, fmt: str = "jsonl", key: str = "rl.prompts_path") -> list:
  """Every Prompt of the files matching `path` (config.`key`) in format `fmt`."""
  out = []
  for where, rec in formats.records(fmt, path, key):
    p = parse_record(rec, where)
    if need_answer and p.answer is None:
      raise UserError(f"{where}: needs an 'answer' (a reward function compares against it)",
                      hint="add \"answer\" to every record, or set the answer rewards' weights to 0")
    out.append(p)
  if not out:
    raise UserError(f"{path}: no prompts")
  return out


class PromptSource:
  """`next()` -> the prompts of one iteration; get_state / set_state for resuming. `counts`: what
  became of the JSONL records (sources.Counts)."""

  def __init__(self, n: int, seed: int, records: Optional[list] = None,
               counts: Optional[sources.Counts] = None):
    self.n, self.seed, self.records, self.counts = n, seed, records, counts
    self.iteration = 0   # builtin
    self.consumed = 0    # jsonl

  def next(self) -> list:
    if self.records is None:
      out = [from_problem(p) for p in corpus.train_problems((self.seed, self.iteration, STREAM), self.n)]
    else:
      m = len(self.records)
      idx = [self._order(i // m)[i % m] for i in range(self.consumed, self.consumed + self.n)]
      out = [self.records[i] for i in idx]
      self.consumed += self.n
    self.iteration += 1
    return out

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

  def get_state(self) -> dict:
    return {"iteration": self.iteration, "consumed": self.consumed}

  def set_state(self, state: dict) -> None:
    self.iteration, self.consumed = int(state["iteration"]), int(state["consumed"])

  def describe(self) -> str:
    if self.records is None:
      return f"prompts: {self.n} fresh built-in problems per iteration"
    note = self.counts.note() if self.counts else f"{len(self.records)} file prompts"
    return f"prompts: {self.n} per iteration from {note}"

  def warning(self) -> str:
    return self.counts.warning() if self.counts else ""


def fit(records: list, tok, template: str, width: int, overlong: str, path: str, fmt: str = "jsonl"):
  """(the records kept, their sources.Counts): prompts longer than `width` tokens are dropped
  (overlong "drop") or kept to be cut from the left by `encode` ("truncate")."""
  long = [len(_ids(tok, p, template)) > width for p in records]
  counts = sources.Counts(f"{fmt} prompts", f"config.rl.max_prompt_len={width}", overlong, len(records),
                          **({"dropped": sum(long)} if overlong == "drop" else {"truncated": sum(long)}))
  counts.check(path)
  return [p for p, cut in zip(records, long) if not (cut and overlong == "drop")], counts


def make_source(config, need_answer: bool, tok) -> PromptSource:
  n = rl_config.sampled_prompts(config)
  if config.rl.prompts == "builtin":
    return PromptSource(n, config.seed)
  path, fmt = config.rl.prompts_path, config.rl.prompts
  records, counts = fit(read(path, need_answer, fmt), tok, config.data.chat_template,
                        config.rl.max_prompt_len, sources.overlong(config), path, fmt)
  return PromptSource(n, config.seed, records, counts)


def heldout_problems(config) -> list:
  """Problems for rl/accuracy.py `evaluate_problems`: builtin held-out, or rl.eval_path records."""
  n = config.rl.num_eval_problems
  if not config.rl.eval_path:
    return corpus.heldout_problems(n)
  fmt = "jsonl" if config.rl.prompts == "builtin" else config.rl.prompts
  recs = read(config.rl.eval_path, True, fmt, "rl.eval_path")[:n]
  for i, p in enumerate(recs):
    if len(p.messages) != 1 or p.messages[0]["role"] != "user":
      raise UserError(f"{config.rl.eval_path}: record {i + 1} must be a {{'prompt', 'answer'}} record")
  return [corpus.Problem(p.messages[0]["content"], "", p.answer) for p in recs]


def _ids(tok, prompt: Prompt, template: str) -> list[int]:
  """The token ids of a prompt with its generation prompt."""
  return tokenizer_lib.apply_chat_template(tok, list(prompt.messages), template, add_generation_prompt=True)[0]


def encode(tok, prompts: list, template: str, width: int):
  """(tokens, mask) int32 [len(prompts), width], left-padded; longer prompts lose their start."""
  seqs = [_ids(tok, p, template)[-width:] for p in prompts]
  tokens, mask = left_pad(seqs, tok.pad_id)
  pad = width - tokens.shape[1]
  return (np.pad(tokens, ((0, 0), (pad, 0)), constant_values=tok.pad_id),
          np.pad(mask, ((0, 0), (pad, 0))))
