"""SentencePiece tokenizer: training, loading, special tokens and chat templates.

Kiln tokenizers are byte-fallback BPE models with fixed ids

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)   4 <|im_start|>   5 <|im_end|>

then 256 byte pieces, then characters and merges. Text is not normalized (no NFKC, no
whitespace folding, no dummy prefix), so `decode(encode(s)) == s` for any string and
`encode(a) + encode(b)` decodes to `a + b`, which the chat templates rely on.

Chat templates turn `[{"role": ..., "content": ...}, ...]` into `(ids, assistant_mask)`:
- "chatml":  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.
- "llama2":  `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>` per turn.
- "hf":      the tokenizer's own jinja template (Llama 3, Qwen2, Mistral, ...), the same ids as
             `transformers`' apply_chat_template (model/chat_template.py).
assistant_mask is 1 on assistant content and its end token, 0 elsewhere.
"""
import collections
import io
import json
import os
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm

from configs.errors import UserError
from model import chat_template

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_IDS = {PAD: 0, UNK: 1, BOS: 2, EOS: 3, IM_START: 4, IM_END: 5}
NUM_FIXED = 6 + 256  # special ids + byte-fallback pieces
MIN_VOCAB = NUM_FIXED + 10
ROLES = ("system", "user", "assistant")
TEMPLATES = ("chatml", "llama2", "hf")


class Tokenizer:
  """A loaded SentencePiece model plus the ids Kiln needs (pad/bos/eos/chat tokens)."""

  def __init__(self, model_proto: bytes, path: str = ""):
    self.path = path
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

  def __getstate__(self):  # SentencePieceProcessor does not pickle; rebuild it.
    return {"model_proto": self.model_proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["path"])

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    """The pad id; foreign models without a pad piece pad with unk."""
    return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def im_start_id(self) -> int | None:
    return self._special(IM_START)

  @property
  def im_end_id(self) -> int | None:
    return self._special(IM_END)

  def _special(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    return None if i == self.sp.unk_id() else i

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self.sp.encode(text)
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad and out-of-vocabulary ids (e.g. from a padded model vocab) are dropped."""
    n, pad = self.vocab_size, self.sp.pad_id()
    return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n and int(i) != pad])

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))


def _common_characters_only(texts: list[str], vocab_size: int) -> list[str]:
  """texts without characters outside the commonest (vocab_size - 262) // 2.

  Each character SentencePiece keeps costs a vocab slot and it insists on covering at
  least 98% of the text, so tiny vocabs train on text reduced to their commonest
  characters; the dropped ones still encode, as byte pieces.
  """
  counts = collections.Counter()
  for t in texts:
    counts.update(t)
  keep = max(1, (vocab_size - NUM_FIXED) // 2)
  if len(counts) <= keep:
    return texts
  drop = "".join(c for c, _ in counts.most_common()[keep:])
  table = str.maketrans("", "", drop)
  return [u for u in (t.translate(table) for t in texts) if u]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> Tokenizer:
  """Trains a deterministic byte-fallback BPE model on `texts`, writes it atomically to out_path."""
  if vocab_size < MIN_VOCAB:
    raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs {NUM_FIXED} "
                     f"fixed pieces; use vocab_size >= {MIN_VOCAB}")
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError(f"no text to train a tokenizer with vocab_size={vocab_size}")
  texts = _common_characters_only(texts, vocab_size)
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=writer, model_type="bpe",
        vocab_size=vocab_size, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=[IM_START, IM_END], byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=1 << 20, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"could not train a tokenizer with vocab_size={vocab_size} on "
                     f"{len(texts)} texts (corpus too small for this vocab?): {e}") from e
  proto = writer.getvalue()
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".model.tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(proto)
  os.replace(tmp, out_path)
  return Tokenizer(proto, out_path)


def load_sentencepiece(path: str) -> Tokenizer:
  """Loads an existing SentencePiece `.model` file (any kind of tokenizer: model/hf_tokenizer.py
  `load_tokenizer`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer model not found: {path}")
  with open(path, "rb") as f:
    return Tokenizer(f.read(), path)


def _check_messages(messages: Sequence[dict]) -> None:
  for i, m in enumerate(messages):
    if m.get("role") not in ROLES:
      raise ValueError(f"message {i} has unknown role {m.get('role')!r}; expected one of {ROLES}")
    if not isinstance(m.get("content"), str):
      raise ValueError(f"message {i} ({m['role']}) has no string 'content'")


def _chatml(tok, messages, add_generation_prompt):
  """[(ids, mask)] pieces of a ChatML conversation."""
  if tok.im_start_id is None or tok.im_end_id is None:
    other = "'hf' (its own chat template)" if getattr(tok, "chat_template", None) else "'llama2'"
    raise ValueError(f"tokenizer {tok.path!r} has no {IM_START}/{IM_END} for the chatml template; use {other}")
  parts = []
  for m in messages:
    a = int(m["role"] == "assistant")
    parts.append((tok.encode(f"{IM_START}{m['role']}\n"), 0))
    parts.append((tok.encode(m["content"]) + [tok.im_end_id], a))
    parts.append((tok.encode("\n"), 0))
  if add_generation_prompt:
    parts.append((tok.encode(f"{IM_START}assistant\n"), 0))
  return parts


def _llama2(tok, messages, add_generation_prompt):
  """[(ids, mask)] pieces of a Llama-2 chat conversation (user/assistant alternate)."""
  system = ""
  if messages and messages[0]["role"] == "system":
    system, messages = messages[0]["content"], messages[1:]
  parts = []
  for i, m in enumerate(messages):
    want = "user" if i % 2 == 0 else "assistant"
    if m["role"] != want:
      raise ValueError(f"llama2 template needs alternating user/assistant turns after an "
                       f"optional first system message; turn {i} has role {m['role']!r}")
    if want == "user":
      sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if (i == 0 and system) else ""
      parts.append(([tok.bos_id] + tok.encode(f"[INST] {sys_block}{m['content']} [/INST] "), 0))
    else:
      parts.append((tok.encode(f"{m['content']} ") + [tok.eos_id], 1))
  if add_generation_prompt and len(messages) % 2 == 0:
    raise ValueError("llama2 generation prompt needs the conversation to end with a user turn")
  return parts


def _hf(tok, messages, add_generation_prompt):
  """(ids, mask) of a conversation in the tokenizer's own template: the text tokenized whole."""
  source = _source(tok)
  if add_generation_prompt:
    text, spans = chat_template.render(source, messages, True, tok.template_variables)[0], []
  else:
    text, spans = chat_template.assistant_spans(source, messages, tok.template_variables, _end_of_turn(tok)[0],
                                                tok.special_tokens)
  ids, offsets = tok.encode_offsets(text)
  return ids, chat_template.token_mask(offsets, spans)


def _source(tok) -> str:
  source = getattr(tok, "chat_template", None)
  if not source:
    raise ValueError(f"tokenizer {tok.path!r} has no chat template (no chat_template.jinja, no chat_template "
                     f"in tokenizer_config.json) for template 'hf'; use 'chatml' or 'llama2'")
  return source


def _end_of_turn(tok) -> tuple[str, str]:
  return chat_template.end_of_turn(_source(tok), tuple(sorted(tok.template_variables.items())),
                                   tuple(tok.special_tokens))


def apply_chat_template(tok: Tokenizer, messages: Sequence[dict], template: str = "chatml",
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """Token ids of a conversation and its assistant mask (1 = assistant content + end token)."""
  _check_messages(messages)
  if template == "hf":
    return _hf(tok, messages, add_generation_prompt)
  if template == "chatml":
    parts = _chatml(tok, messages, add_generation_prompt)
  elif template == "llama2":
    parts = _llama2(tok, messages, add_generation_prompt)
  else:
    raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
  ids = [i for p, _ in parts for i in p]
  mask = [a for p, a in parts for _ in p]
  return ids, mask


def stop_id(tok: Tokenizer, template: str = "chatml") -> int:
  """The id that ends an assistant turn, where generation stops ('hf': the first special token the
  template writes after an assistant's content, else eos)."""
  if template == "chatml":
    if tok.im_end_id is None:
      raise ValueError(f"tokenizer {tok.path!r} has no {IM_END} for the chatml template")
    return tok.im_end_id
  if template == "llama2":
    return tok.eos_id
  if template == "hf":
    token = _end_of_turn(tok)[1]
    return tok.encode(token)[0] if token else tok.eos_id
  raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")


def template_key(tok, template: str) -> str:
  """What a template's token ids depend on besides the tokenizer's model (for cache keys): its name,
  and for 'hf' the jinja source and the special tokens it sees."""
  if template != "hf":
    return template
  return json.dumps([template, getattr(tok, "chat_template", None), getattr(tok, "template_variables", {})],
                    sort_keys=True)


def check_template(tok, template: str) -> None:
  """Raises UserError when `tok` cannot write conversations in `template` (config.data.chat_template)."""
  probe = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
  try:
    apply_chat_template(tok, probe, template)
    stop_id(tok, template)
  except Exception as e:  # a ValueError, or any error the template's jinja raises
    raise UserError(f"config.data.chat_template={template!r}: {e}",
                    hint=f"one of {', '.join(TEMPLATES)}; 'hf' renders the tokenizer's own chat template") from e
