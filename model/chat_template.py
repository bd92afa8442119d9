"""A tokenizer's own chat template (`data.chat_template=hf`): its jinja source rendered as
`transformers`' `apply_chat_template` renders it, plus where the assistant turns lie in the text.

Rendering: a sandboxed jinja2 environment with trim_blocks, lstrip_blocks and the loop controls,
and what transformers gives a template: `raise_exception`, `strftime_now`, a `tojson` that does
not escape HTML, `messages`, `add_generation_prompt`, `tools=None`, `documents=None` and the
tokenizer's special tokens (`bos_token`, `eos_token`, ...). The text is then tokenized whole
(model/tokenizer.py `_hf`), so the ids are those of `apply_chat_template(messages)`.

Assistant spans (the loss mask), in characters of the rendered text:
- a template with `{% generation %}...{% endgeneration %}` blocks: those blocks, as
  transformers' `return_assistant_tokens_mask`;
- else, for each assistant message, from where the model starts writing to where its turn ends.
  Its content is found by rendering the conversation again with that content replaced (the
  first and the last character that change). The start moves back over whitespace to the end
  of the generation prompt (the messages before it rendered with add_generation_prompt): to the
  last place before the content where that prompt's tail, from its last special token on,
  ends (`_prompt_end`), so the space Mistral writes after `[/INST]` is learnt too; a tail, not
  the whole prompt, since a template may write earlier messages differently when they are last
  (Mistral's system prompt goes into the last user message). The end moves on over the
  template's end of turn when it follows the content: what the template writes after an
  assistant's content through its first special token (`<|eot_id|>`, `<|im_end|>`, `</s>`),
  read once from a probe conversation (`end_of_turn`).
A token belongs to the mask when its characters overlap a span (`token_mask`).
"""
import datetime
import functools
import json
import re

import jinja2
from jinja2 import ext, nodes, sandbox

OPEN, CLOSE = "\ue000", "\ue001"  # written around a {% generation %} block's output, removed after
PROBE = "\ue002"                  # stands in for a message's content, to find where it is rendered
RESERVED = OPEN + CLOSE + PROBE
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _Generation(ext.Extension):
  """`{% generation %}...{% endgeneration %}`: the block's output between OPEN and CLOSE."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

  def _mark(self, caller):
    return OPEN + caller() + CLOSE


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[_Generation, ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
  return env.from_string(source)


def render(source: str, messages, add_generation_prompt: bool, variables: dict) -> tuple[str, list]:
  """(the text of `messages`, the [start, end) character spans of its {% generation %} blocks)."""
  raw = compile_template(source).render(**variables, messages=list(messages), tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt)
  text, spans, n, start = [], [], 0, None
  for part in re.split(f"([{OPEN}{CLOSE}])", raw):
    if part == OPEN:
      start = n
    elif part == CLOSE:
      spans.append((start, n))
    else:
      text.append(part)
      n += len(part)
  return "".join(text), spans


@functools.lru_cache(maxsize=32)
def end_of_turn(source: str, variables: tuple, specials: tuple) -> tuple[str, str]:
  """(what the template writes after an assistant's content through its first special token, that
  token), both '' when it writes none; `variables` as sorted (name, value) items."""
  probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": PROBE}]
  text, _ = render(source, probe, False, dict(variables))
  tail = text[text.rindex(PROBE) + 1:] if PROBE in text else ""
  found = sorted((tail.find(s), -len(s), s) for s in specials if s and s in tail)
  if not found:
    return "", ""
  at, _, token = found[0]
  return tail[:at + len(token)], token


def _common_prefix(a: str, b: str) -> int:
  """The length of the longest common prefix of a and b (binary search on slice comparisons)."""
  lo, hi = 0, min(len(a), len(b))
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
  return lo


def _prompt_end(prompt: str, text: str, start: int, specials) -> int:
  """The end of the last occurrence in text[:start] of `prompt`'s tail from its last special token
  on (all of it without one), when only whitespace lies between it and `start`; else `start`."""
  cut = max([prompt.rfind(s) for s in specials if s] + [0])
  tail = prompt[cut:]
  at = text.rfind(tail, 0, start) if tail else -1
  return at + len(tail) if at >= 0 and not text[at + len(tail):start].strip() else start


def assistant_spans(source: str, messages, variables: dict, end_text: str, specials=()) -> tuple[str, list]:
  """(the text of `messages`, the character spans of its assistant turns); see the module docstring."""
  for i, m in enumerate(messages):
    if any(c in m["content"] for c in RESERVED):
      raise ValueError(f"message {i} contains a reserved character U+E000..U+E002")
  text, marked = render(source, messages, False, variables)
  if GENERATION.search(source):
    return text, marked
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    other, _ = render(source, [*messages[:i], {**m, "content": PROBE}, *messages[i + 1:]], False, variables)
    if other == text:  # the template does not write this message
      continue
    start = _common_prefix(text, other)
    end = len(text) - _common_prefix(text[start:][::-1], other[start:][::-1])
    try:
      start = _prompt_end(render(source, messages[:i], True, variables)[0], text, start, specials)
    except jinja2.TemplateError:  # e.g. a template that needs a user message first
      pass
    if end_text and text.startswith(end_text, end):
      end += len(end_text)
    spans.append((start, end))
  return text, spans


def token_mask(offsets, spans) -> list[int]:
  """1 for each token whose [start, end) characters overlap one of `spans`, else 0."""
  return [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]
