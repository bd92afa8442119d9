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
`pad_id`, `bos_id`, `eos_id`, `im_start_id`, `im_end_id`, `id_to_piece`, `path`, `model_proto`.
`load_tokenizer` reads any tokenizer: these, or a Kiln SentencePiece `.model` file.
"""
import json
import os
import re

from model import tokenizer as kiln_tokenizer

BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|endoftext|>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>")


def _token_text(t):
  """A special-token entry of tokenizer_config.json: "<s>" or {"content": "<s>", ...}."""
  return t.get("content") if isinstance(t, dict) else t


def read_tokenizer_config(directory: str) -> dict:
  path = os.path.join(directory, "tokenizer_config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _pick(config: dict, key: str, names, lookup):
  """Id of config[key] (e.g. "bos_token") if set, else of the first of `names` in the vocab."""
  for text in ([_token_text(config[key])] if config.get(key) else []) + list(names):
    i = lookup(text) if text else None
    if i is not None:
      return i
  return None


class JsonTokenizer:
  """A `tokenizers` tokenizer.json plus the ids Kiln needs."""

  def __init__(self, json_bytes: bytes, path: str = "", config: dict = None):
    from tokenizers import Tokenizer as Backend
    self.path, self.model_proto, self.config = path, json_bytes, dict(config or {})
    self.tok = Backend.from_str(json_bytes.decode("utf-8"))
    lookup = self.tok.token_to_id
    self.bos_id = _pick(self.config, "bos_token", BOS_NAMES, lookup)
    self.eos_id = _pick(self.config, "eos_token", EOS_NAMES, lookup)
    pad = _pick(self.config, "pad_token", PAD_NAMES, lookup)
    self._real_pad = pad  # without a pad token, pad with eos (padding is masked) but decode it
    self.pad_id = pad if pad is not None else self.eos_id
    self.im_start_id = lookup(kiln_tokenizer.IM_START)
    self.im_end_id = lookup(kiln_tokenizer.IM_END)

  def __getstate__(self):
    return {"json_bytes": self.model_proto, "path": self.path, "config": self.config}

  def __setstate__(self, state):
    self.__init__(**state)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids) -> str:
    """Text of `ids`; pad and out-of-vocabulary ids (from a padded model vocab) are dropped."""
    n = self.vocab_size
    keep = [int(i) for i in ids if 0 <= int(i) < n and int(i) != self._real_pad]
    return self.tok.decode(keep, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self.tok.id_to_token(int(i))


class SpecialsTokenizer(kiln_tokenizer.Tokenizer):
  """A sentencepiece model that also turns special tokens written in the text into their ids."""

  def __init__(self, model_proto: bytes, path: str = "", specials=()):
    super().__init__(model_proto, path)
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    control = [p.piece for p in proto.pieces if p.type in (2, 3, 4)]  # UNKNOWN, CONTROL, USER_DEFINED
    known = lambda s: self.sp.id_to_piece(self.sp.piece_to_id(s)) == s
    self.specials = sorted({s for s in list(specials) + control if s and known(s)}, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") if self.specials else None
    proto.normalizer_spec.add_dummy_prefix = False  # for the text after a special token
    self.sp_rest = SentencePieceProcessor(model_proto=proto.SerializeToString())

  def __getstate__(self):
    return {**super().__getstate__(), "specials": self.specials}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["path"], state["specials"])

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    chunks = self._split.split(text) if self._split else [text]
    ids = []
    for k, chunk in enumerate(chunks):
      if k % 2:  # a special token
        ids.append(self.sp.piece_to_id(chunk))
      elif chunk:
        first = k == 0 and not chunk.startswith(" ")
        ids += (self.sp if first else self.sp_rest).encode(chunk)
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

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
      return JsonTokenizer(f.read(), json_path, config)
  sp_path = os.path.join(directory, "tokenizer.model")
  if not os.path.isfile(sp_path):
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
  added = [_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()]
  added += [_token_text(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)]
  with open(sp_path, "rb") as f:
    return SpecialsTokenizer(f.read(), sp_path, added)


def load_tokenizer(path: str):
  """Any tokenizer Kiln reads: a Hugging Face directory or tokenizer.json (`load`), else a
  SentencePiece `.model` file (model/tokenizer.py)."""
  if os.path.isdir(path) or path.endswith(".json"):
    return load(path)
  return kiln_tokenizer.load_sentencepiece(path)
