"""Tokenizers of Hugging Face checkpoint directories, behind model/tokenizer.py's interface.

- `tokenizer.json` (Llama 3, Qwen2, any `tokenizers` model): `JsonTokenizer`, through the
  `tokenizers` package; special tokens written in text (`<|im_start|>`, `<|begin_of_text|>`)
  become their single ids, as in `transformers`.
- `tokenizer.model` (Llama 2, Mistral): `SpecialsTokenizer`, sentencepiece itself, with the text
  first split on the special tokens (control pieces such as `<s>`, `</s>` and the added tokens of
  `tokenizer_config.json`); only the text before the first special token gets sentencepiece's
  dummy-prefix space, and not when it starts with a space: what `transformers`' Llama tokenizer
  does (legacy=False).

bos / eos / pad come from `tokenizer_config.json` when it names them, else from the usual names.
Both classes have model/tokenizer.py's Tokenizer interface: `encode`, `decode`, `vocab_size`,
`pad_id`, `bos_id`, `eos_id`, `im_start_id`, `im_end_id`, `id_to_piece`, `path`, `model_proto`;
and what the model's own chat template needs (model/chat_template.py): `chat_template` (the
jinja source of chat_template.jinja, else of tokenizer_config.json's chat_template; None
without one), `template_variables` (bos_token, eos_token, ... as text), `special_tokens` (their
texts) and `encode_offsets` (ids and the [start, end) characters of each).
`load_tokenizer` reads any tokenizer: these, or a Kiln SentencePiece `.model` file.
"""
import json
import os
import re

from model import tokenizer as kiln_tokenizer

BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|endoftext|>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>")
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(t):
  """A special-token entry of tokenizer_config.json: "<s>" or {"content": "<s>", ...}."""
  return t.get("content") if isinstance(t, dict) else t


def read_tokenizer_config(directory: str) -> dict:
  path = os.path.join(directory, "tokenizer_config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def read_chat_template(directory: str, config: dict):
  """The default chat template of a HF tokenizer directory: chat_template.jinja, else
  tokenizer_config.json's chat_template (a string, or a list of {"name", "template"}: the
  "default" one); None without one."""
  path = os.path.join(directory, TEMPLATE_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  t = config.get("chat_template")
  if isinstance(t, list):
    t = {e.get("name"): e.get("template") for e in t}.get("default")
  return t if isinstance(t, str) and t else None


def template_variables(config: dict) -> dict:
  """{"bos_token": "<s>", ...}: the special tokens tokenizer_config.json names, as a template sees them."""
  return {k: _token_text(config[k]) for k in SPECIAL_KEYS if config.get(k) and _token_text(config[k])}


def _pick(config: dict, key: str, names, lookup):
  """Id of config[key] (e.g. "bos_token") if set, else of the first of `names` in the vocab."""
  for text in ([_token_text(config[key])] if config.get(key) else []) + list(names):
    i = lookup(text) if text else None
    if i is not None:
      return i
  return None


class JsonTokenizer:
  """A `tokenizers` tokenizer.json plus the ids Kiln needs."""

  def __init__(self, json_bytes: bytes, path: str = "", config: dict = None, chat_template: str = None):
    from tokenizers import Tokenizer as Backend
    self.path, self.model_proto, self.config = path, json_bytes, dict(config or {})
    self.chat_template, self.template_variables = chat_template, template_variables(self.config)
    self.tok = Backend.from_str(json_bytes.decode("utf-8"))
    lookup = self.tok.token_to_id
    self.bos_id = _pick(self.config, "bos_token", BOS_NAMES, lookup)
    self.eos_id = _pick(self.config, "eos_token", EOS_NAMES, lookup)
    pad = _pick(self.config, "pad_token", PAD_NAMES, lookup)
    self._real_pad = pad  # without a pad token, pad with eos (padding is masked) but decode it
    self.pad_id = pad if pad is not None else self.eos_id
    self.im_start_id = lookup(kiln_tokenizer.IM_START)
    self.im_end_id = lookup(kiln_tokenizer.IM_END)
    self.special_tokens = tuple(t.content for t in self.tok.get_added_tokens_decoder().values() if t.special)

  def __getstate__(self):
    return {"json_bytes": self.model_proto, "path": self.path, "config": self.config,
            "chat_template": self.chat_template}

  def __setstate__(self, state):
    self.__init__(**state)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids of `text`, the [start, end) characters of each)."""
    e = self.tok.encode(text, add_special_tokens=False)
    return e.ids, e.offsets

  def decode(self, ids) -> str:
    """Text of `ids`; pad and out-of-vocabulary ids (from a padded model vocab) are dropped."""
    n = self.vocab_size
    keep = [int(i) for i in ids if 0 <= int(i) < n and int(i) != self._real_pad]
    return self.tok.decode(keep, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self.tok.id_to_token(int(i))


class SpecialsTokenizer(kiln_tokenizer.Tokenizer):
  """A sentencepiece model that also turns special tokens written in the text into their ids."""

  def __init__(self, model_proto: bytes, path: str = "", specials=(), config: dict = None,
               chat_template: str = None):
    super().__init__(model_proto, path)
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    control = [p.piece for p in proto.pieces if p.type in (2, 3, 4)]  # UNKNOWN, CONTROL, USER_DEFINED
    known = lambda s: self.sp.id_to_piece(self.sp.piece_to_id(s)) == s
    self.specials = sorted({s for s in list(specials) + control if s and known(s)}, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") if self.specials else None
    proto.normalizer_spec.add_dummy_prefix = False  # for the text after a special token
    self.sp_rest = SentencePieceProcessor(model_proto=proto.SerializeToString())
    self.config, self.chat_template = dict(config or {}), chat_template
    self.template_variables, self.special_tokens = template_variables(self.config), tuple(self.specials)

  def __getstate__(self):
    return {**super().__getstate__(), "specials": self.specials, "config": self.config,
            "chat_template": self.chat_template}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["path"], state["specials"], state.get("config"),
                  state.get("chat_template"))

  def _chunks(self, text: str):
    """(chunk, the sentencepiece processor that encodes it; None for a special token) of `text`."""
    for k, chunk in enumerate(self._split.split(text) if self._split else [text]):
      if k % 2:
        yield chunk, None
      elif chunk:  # only the text at the very start gets the dummy-prefix space
        yield chunk, self.sp if k == 0 and not chunk.startswith(" ") else self.sp_rest

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = []
    for chunk, sp in self._chunks(text):
      ids += sp.encode(chunk) if sp else [self.sp.piece_to_id(chunk)]
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids of `text`, the [start, end) characters of each)."""
    from sentencepiece import sentencepiece_pb2
    ids, offsets, at = [], [], 0
    for chunk, sp in self._chunks(text):
      if sp is None:
        ids.append(self.sp.piece_to_id(chunk))
        offsets.append((at, at + len(chunk)))
      else:
        char_at = [c for c, ch in enumerate(chunk) for _ in ch.encode("utf-8")] + [len(chunk)]  # byte -> char
        for p in sentencepiece_pb2.SentencePieceText.FromString(sp.encode(chunk, out_type="serialized_proto")).pieces:
          ids.append(p.id)
          offsets.append((at + char_at[p.begin], at + char_at[p.end]))
      at += len(chunk)
    return ids, offsets

  def decode(self, ids) -> str:
    """Text of `ids` with special tokens written out; pad and out-of-vocabulary ids are dropped."""
    n, pad = self.vocab_size, self.sp.pad_id()
    special = {self.sp.piece_to_id(s) for s in self.specials}
    out, run = [], []
    for i in [int(i) for i in ids if 0 <= int(i) < n and int(i) != pad] + [None]:
      if i is None or i in special:
        if run:  # only text at the very start loses its dummy-prefix space
          out.append((self.sp if not out else self.sp_rest).decode(run))
          run = []
        if i is not None:
          out.append(self.sp.id_to_piece(i))
      else:
        run.append(i)
    return "".join(out)


def load(path: str):
  """The tokenizer of a HF directory (tokenizer.json, else tokenizer.model) or a tokenizer.json file."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config = read_tokenizer_config(directory)
  json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if json_path.endswith(".json") and os.path.isfile(json_path):
    with open(json_path, "rb") as f:
      return JsonTokenizer(f.read(), json_path, config, read_chat_template(directory, config))
  sp_path = os.path.join(directory, "tokenizer.model")
  if not os.path.isfile(sp_path):
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
  added = [_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()]
  added += [_token_text(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)]
  with open(sp_path, "rb") as f:
    return SpecialsTokenizer(f.read(), sp_path, added, config, read_chat_template(directory, config))


def load_tokenizer(path: str):
  """Any tokenizer Kiln reads: a Hugging Face directory or tokenizer.json (`load`), else a
  SentencePiece `.model` file (model/tokenizer.py)."""
  if os.path.isdir(path) or path.endswith(".json"):
    return load(path)
  return kiln_tokenizer.load_sentencepiece(path)
