"""Data for pretraining and SFT: documents -> tokens -> packed rows on disk -> grain batches.

Sources (`config.data.source`):
- "builtin": generated word problems (+ English prose from Python itself for pretraining),
  see train/corpus.py. Eval = the fixed held-out problems (never in training).
- "text": files matching `data.path` (glob); one document per blank-line-separated paragraph.
- "jsonl": one record per line; pretrain `{"text": ...}` (key = data.text_key), sft
  `{"messages": [{"role", "content"}, ...]}` or `{"prompt": ..., "completion": ...}`.
- "tfds": `data.tfds_name` read with `tfds.data_source`, or (name empty) the local
  `data.path` / `data.eval_path` files converted once into a TFDS array_record dataset by
  `KilnFiles` (files ending .jsonl are JSONL, others text) and read back with
  `builder.as_data_source()`; TFDS writes and reads array_record without tensorflow.
Without an eval file / eval split, every 50th document (index % 50 == 0) is held out.
Every document of a split is read into memory and packed up front (data.max_documents
caps how many), which suits corpora up to a few GB, not all of C4.

Packing happens once per (documents, tokenizer, seq_len, objective, ...) and is cached in
`data.cache_dir/packed/<hash>/rows.array_record`, one record per row of seq_len tokens:
int32 [5, seq_len] = inputs, targets, segment_ids (1.. per document, 0 = pad), positions
(restart per document), loss_mask. Documents are not split across rows unless longer than
seq_len (then each seq_len chunk is its own segment).

Batches: the train rows are shuffled per epoch with config.seed (forever). Global batch s
is shuffled rows [s*B, (s+1)*B); process p of P gets rows [s*B + p*b, s*B + (p+1)*b) with
b = B // P, so any P sees the same global batches. Iterator state = {"step": s}.
"""
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile

from array_record.python import array_record_module
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from model import tokenizer as tokenizer_lib
from train import corpus

FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
EVAL_EVERY = 50  # without an eval file, documents with index % 50 == 0 are held out
BUILTIN_SEED = 0  # the built-in corpus is the same for every run
BUILTIN_TOKENIZER_PROBLEMS = 20000  # builtin tokenizer corpus, fixed so pretrain and SFT share it
PACK_VERSION = 1


def default_data_config() -> ml_collections.ConfigDict:
  """Every `config.data` key with its default."""
  return ml_collections.ConfigDict(dict(
      source="builtin",       # builtin | text | jsonl | tfds
      path="",                # file or glob (text, jsonl, local tfds)
      eval_path="",           # held-out file or glob; '' = hold out every 50th document
      tfds_name="",           # registered TFDS name; '' = build `KilnFiles` from path
      tfds_data_dir="",       # TFDS data_dir for tfds_name; '' = TFDS default
      tfds_split="train",
      tfds_eval_split="",     # '' = 'eval' of a local build with eval_path, else hold out
      text_key="text",        # pretraining text field in jsonl / tfds records
      num_documents=20000,    # builtin: number of generated problems
      max_documents=0,        # text/jsonl/tfds: read at most this many per split; 0 = all
      cache_dir="",           # '' = ~/.cache/kiln
      chat_template="chatml",  # chatml | llama2 (sft)
      train_on_prompt=False,  # sft: loss on every token instead of assistant tokens only
  ))


def default_tokenizer_config() -> ml_collections.ConfigDict:
  """Every `config.tokenizer` key: path '' = train one with vocab config.model.vocab_size."""
  return ml_collections.ConfigDict(dict(path=""))


def cache_dir(config) -> str:
  return os.path.expanduser(config.data.cache_dir or "~/.cache/kiln")


def _hash(*parts) -> str:
  """Short stable hash of JSON-able parts."""
  h = hashlib.sha1()
  for p in parts:
    h.update(json.dumps(p, sort_keys=True, ensure_ascii=False).encode())
  return h.hexdigest()[:20]


# ----------------------------------------------------------------------------- records


def _normalize(rec, text_key: str, where: str) -> dict:
  """A raw record as {"text": str | None, "messages": list | None}; ValueError names `where`."""
  if not isinstance(rec, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
  text, messages = rec.get(text_key), rec.get("messages")
  if "prompt" in rec or "completion" in rec:
    if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
      raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings")
    messages = [{"role": "user", "content": rec["prompt"]},
                {"role": "assistant", "content": rec["completion"]}]
  if text is not None and not isinstance(text, str):
    raise ValueError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
  if messages is not None:
    if not isinstance(messages, list) or not messages:
      raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in tokenizer_lib.ROLES:
        raise ValueError(f"{where}: message {i} needs a role in {tokenizer_lib.ROLES}, got {m!r}")
      if not isinstance(m.get("content"), str):
        raise ValueError(f"{where}: message {i} needs a string 'content'")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
  if text is None and messages is None:
    raise ValueError(f"{where}: record has none of {text_key!r}, 'messages', 'prompt'/'completion'")
  return {"text": text, "messages": messages}


def _select(rec: dict, objective: str, where: str):
  """The document an objective trains on: text (pretrain) or messages (sft)."""
  doc = rec["text"] if objective == "pretrain" else rec["messages"]
  if not doc:
    want = "text" if objective == "pretrain" else "'messages' or 'prompt'/'completion'"
    raise ValueError(f"{where}: objective {objective!r} needs {want} in every record")
  return doc


def _files(pattern: str, key: str) -> list[str]:
  files = sorted(glob.glob(os.path.expanduser(pattern))) if pattern else []
  if not files:
    raise FileNotFoundError(f"config.data.{key}={pattern!r} matches no file")
  return files


def _file_records(path: str, text_key: str, jsonl: bool):
  """Yields (where, normalized record): the lines of a JSONL file or the paragraphs of a text file."""
  with open(path, encoding="utf-8") as f:
    if jsonl:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield f"{path}:{n}", _normalize(rec, text_key, f"{path}:{n}")
    else:
      for i, para in enumerate(re.split(r"\n\s*\n", f.read())):
        if para.strip():
          yield f"{path}:paragraph {i}", {"text": para.strip(), "messages": None}


class KilnFiles(tfds.core.GeneratorBasedBuilder):
  """TFDS dataset of local text / JSONL files: split 'train' from `train_files`, 'eval' from `eval_files`."""

  VERSION = tfds.core.Version("1.0.0")
  # No checksums file to find; also skips TFDS's lookup of the module's resource path,
  # which needs the `importlib_resources` package for classes inside a package.
  code_path = None

  def __init__(self, *, train_files=(), eval_files=(), text_key="text", **kwargs):
    self._split_files = {"train": list(train_files), "eval": list(eval_files)}
    self._text_key = text_key
    super().__init__(**kwargs)

  def _info(self):
    message = {"role": tfds.features.Text(), "content": tfds.features.Text()}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "messages": tfds.features.Sequence(message)}))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(f) for s, f in self._split_files.items() if f}

  def _generate_examples(self, files):
    for path in files:
      for where, rec in _file_records(path, self._text_key, path.endswith(".jsonl")):
        yield where, {"text": rec["text"] or "", "messages": rec["messages"] or []}


def _local_tfds(config) -> dict:
  """Builds (once, atomically) the KilnFiles dataset of data.path / data.eval_path; its data sources."""
  d = config.data
  train = _files(d.path, "path")
  evals = _files(d.eval_path, "eval_path") if d.eval_path else []
  key = _hash("kilnfiles", str(KilnFiles.VERSION), d.text_key,
              [(f, _file_sha1(f)) for f in train], [(f, _file_sha1(f)) for f in evals])
  data_dir = os.path.join(cache_dir(config), "tfds", key)
  if not os.path.isdir(data_dir):
    os.makedirs(os.path.dirname(data_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(data_dir), prefix=f".{key}.")
    KilnFiles(train_files=train, eval_files=evals, text_key=d.text_key, data_dir=tmp,
              file_format="array_record").download_and_prepare()
    _publish(tmp, data_dir)
  builder = KilnFiles(data_dir=data_dir, file_format="array_record")
  return builder.as_data_source()


def _file_sha1(path: str) -> str:
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _tfds_docs(source, config, name: str) -> list:
  """Documents of a TFDS data source (Text features arrive as bytes, sequences as dict of lists)."""
  d, out = config.data, []
  for i in range(min(len(source), d.max_documents or len(source))):
    ex, where = source[i], f"tfds {name}[{i}]"
    raw = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()}
    msgs = raw.get("messages")
    if isinstance(msgs, dict):  # {"role": [...], "content": [...]}
      msgs = [{"role": _str(r), "content": _str(c)} for r, c in zip(msgs["role"], msgs["content"])]
      raw["messages"] = msgs or None
    raw = {k: v for k, v in raw.items() if not (v is None or (isinstance(v, str) and not v))}
    out.append(_select(_normalize(raw, d.text_key, where), config.objective, where))
  return out


def _str(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def _holdout(docs: list, split: str) -> list:
  """Deterministic 1/50 hold-out: documents with index % 50 == 0 are eval (at least one)."""
  return [doc for i, doc in enumerate(docs) if (i % EVAL_EVERY == 0) == (split == "eval")]


def load_documents(config, split: str) -> list:
  """The documents of a split: strings (pretrain) or message lists (sft)."""
  d, objective = config.data, config.objective
  if objective not in ("pretrain", "sft"):
    raise ValueError(f"train/data.py serves config.objective 'pretrain' or 'sft', not {objective!r}")
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
  if d.source == "builtin":
    if split == "eval":
      problems = corpus.heldout_problems(max(1, d.num_documents // EVAL_EVERY))
      if objective == "pretrain":
        return [corpus.problem_text(p) for p in problems]
      return [corpus.conversation(p)["messages"] for p in problems]
    if objective == "pretrain":
      return corpus.pretrain_documents(BUILTIN_SEED, d.num_documents)
    return [c["messages"] for c in corpus.sft_conversations(BUILTIN_SEED, d.num_documents)]
  if d.source in ("text", "jsonl"):
    if d.source == "text" and objective == "sft":
      raise ValueError("config.data.source='text' has no conversations; sft needs 'jsonl', 'tfds' or 'builtin'")
    key = "eval_path" if (split == "eval" and d.eval_path) else "path"
    records = (_select(rec, objective, where) for f in _files(d[key], key)
               for where, rec in _file_records(f, d.text_key, d.source == "jsonl"))
    docs = list(itertools.islice(records, d.max_documents or None))
    return docs if d.eval_path else _holdout(docs, split)
  if d.source == "tfds":
    if d.tfds_name:
      read = lambda s: tfds.data_source(d.tfds_name, split=s, data_dir=d.tfds_data_dir or None)
      eval_split = d.tfds_eval_split
    else:
      sources = _local_tfds(config)
      read = lambda s: sources[s]
      eval_split = d.tfds_eval_split or ("eval" if d.eval_path else "")
    s = eval_split if (split == "eval" and eval_split) else d.tfds_split
    docs = _tfds_docs(read(s), config, f"{d.tfds_name or 'kiln_files'}/{s}")
    return docs if eval_split else _holdout(docs, split)
  raise ValueError(f"config.data.source={d.source!r}; expected builtin, text, jsonl or tfds")


# ----------------------------------------------------------------------------- tokenizer


def _doc_text(doc) -> str:
  return doc if isinstance(doc, str) else "\n".join(f"{m['role']}\n{m['content']}" for m in doc)


def load_or_train_tokenizer(config) -> tokenizer_lib.Tokenizer:
  """config.tokenizer.path, or a tokenizer trained on the training corpus (cached by content)."""
  vocab = config.model.get("vocab_size") if "model" in config else None
  if config.tokenizer.path:
    tok = tokenizer_lib.load_tokenizer(os.path.expanduser(config.tokenizer.path))
  else:
    if not vocab:
      raise ValueError("config.model.vocab_size is needed to train a tokenizer (config.tokenizer.path is '')")
    if config.data.source == "builtin":  # one builtin tokenizer for pretrain and sft alike
      texts = corpus.pretrain_documents(BUILTIN_SEED, BUILTIN_TOKENIZER_PROBLEMS)
    else:
      texts = [_doc_text(doc) for doc in load_documents(config, "train")]
    path = os.path.join(cache_dir(config), "tokenizers", f"{_hash(texts, vocab)}-{vocab}.model")
    if os.path.isfile(path):
      tok = tokenizer_lib.load_tokenizer(path)
    else:
      tok = tokenizer_lib.train_tokenizer(texts, vocab, path)
  if vocab and tok.vocab_size > vocab:
    raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces > config.model.vocab_size={vocab}")
  return tok


# ----------------------------------------------------------------------------- packing


def tokenize_document(tok, doc, objective: str, chat_template: str = "chatml",
                      train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
  """(ids, mask) of a document: bos+text+eos with mask 1 (pretrain), or chat ids + assistant mask (sft)."""
  if objective == "pretrain":
    ids = tok.encode(doc, add_bos=True, add_eos=True)
    return ids, [1] * len(ids)
  ids, mask = tokenizer_lib.apply_chat_template(tok, doc, chat_template)
  return ids, ([1] * len(ids) if train_on_prompt else mask)


def pack_rows(examples, seq_len: int, pad_id: int = 0):
  """Greedy next-fit packing of (ids, mask) examples; yields int32 rows [5, seq_len] (FIELDS order).

  Each example gives inputs=ids[:-1], targets=ids[1:], loss_mask=mask[1:]; an example
  that does not fit in the current row starts a new one; one longer than seq_len is cut
  into seq_len chunks, each its own segment.
  """
  def empty():
    row = np.zeros((len(FIELDS), seq_len), np.int32)  # [5, seq_len]
    row[:2] = pad_id
    return row

  row, fill, seg = empty(), 0, 0
  for ids, mask in examples:
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    inputs, targets, loss = ids[:-1], ids[1:], mask[1:]
    for start in range(0, len(inputs), seq_len):
      n = min(seq_len, len(inputs) - start)
      if fill + n > seq_len:
        yield row
        row, fill, seg = empty(), 0, 0
      seg += 1
      span, chunk = slice(fill, fill + n), slice(start, start + n)
      row[0, span], row[1, span], row[4, span] = inputs[chunk], targets[chunk], loss[chunk]
      row[2, span], row[3, span] = seg, np.arange(n)
      fill += n
  if fill:
    yield row


def parse_row(record: bytes) -> dict:
  """One stored row -> {inputs, targets, segment_ids, positions: int32, loss_mask: float32}, each [seq_len]."""
  row = np.frombuffer(record, "<i4").reshape(len(FIELDS), -1)  # [5, seq_len]
  out = {k: row[i].astype(np.int32) for i, k in enumerate(FIELDS)}
  out["loss_mask"] = out["loss_mask"].astype(np.float32)
  return out


def _publish(tmp: str, final: str) -> None:
  """Atomically renames a finished temp dir into place; if another process won, keeps theirs."""
  try:
    os.rename(tmp, final)
  except OSError:
    if not os.path.isdir(final):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def prepare_split(config, tokenizer, split: str) -> str:
  """Tokenizes and packs a split once; returns the cached rows.array_record path."""
  d, tok = config.data, tokenizer
  docs = load_documents(config, split)
  key = _hash(PACK_VERSION, d.source, config.objective, split, config.seq_len, d.num_documents,
              d.chat_template, bool(d.train_on_prompt), hashlib.sha1(tok.model_proto).hexdigest(),
              _hash(docs))
  final = os.path.join(cache_dir(config), "packed", key)
  path = os.path.join(final, "rows.array_record")
  if os.path.isfile(path):
    return path
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f".{key}.")
  examples = (tokenize_document(tok, doc, config.objective, d.chat_template, d.train_on_prompt)
              for doc in docs)
  writer = array_record_module.ArrayRecordWriter(os.path.join(tmp, "rows.array_record"), "group_size:1")
  rows = tokens = loss_tokens = 0
  for row in pack_rows(examples, config.seq_len, tok.pad_id):
    writer.write(row.astype("<i4").tobytes())
    rows, tokens, loss_tokens = rows + 1, tokens + int((row[2] > 0).sum()), loss_tokens + int(row[4].sum())
  writer.close()
  if rows == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ValueError(f"{split} split of config.data.source={d.source!r} has no tokens")
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(dict(split=split, rows=rows, documents=len(docs), tokens=tokens,
                   loss_tokens=loss_tokens, seq_len=config.seq_len), f)
  _publish(tmp, final)
  return path


def prepare(config) -> dict:
  """Tokenizer + packed rows of both splits (run once, e.g. on process 0); returns their paths."""
  tok = load_or_train_tokenizer(config)
  return {"tokenizer": tok.path, "train": prepare_split(config, tok, "train"),
          "eval": prepare_split(config, tok, "eval")}


# ----------------------------------------------------------------------------- batches


def _local_batch(config, process_index: int, process_count: int) -> int:
  B = config.batch_size
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
  if B % process_count:
    raise ValueError(f"config.batch_size={B} is not divisible by the {process_count} processes")
  return B // process_count


def _rows(config, tok, split: str) -> grain.MapDataset:
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource([prepare_split(config, tok, split)]))


class BatchIterator:
  """This process's slices of the global train batches, forever; state = global batches consumed."""

  def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions):
    self._batches, self._read_options = batches, read_options
    self.set_state({"step": 0})

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)  # each [b, seq_len]
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, state: dict) -> None:
    self._step = int(state["step"])
    self._it = iter(self._batches[self._step:].to_iter_dataset(self._read_options))


def make_batch_iterator(config, tokenizer, split: str = "train", process_index: int = 0,
                        process_count: int = 1) -> BatchIterator:
  """Endless shuffled batches {inputs, targets, segment_ids, positions, loss_mask}, each [b, seq_len]."""
  b = _local_batch(config, process_index, process_count)
  seed = int(np.random.SeedSequence(config.seed).generate_state(1)[0])  # grain reseeds epoch e with seed+e
  rows = _rows(config, tokenizer, split).shuffle(seed).repeat().map(parse_row)
  # Batch s*P + p = rows [s*B + p*b, s*B + (p+1)*b). drop_remainder=True because grain
  # sizes a batched infinite dataset with math.ceil(float), which overflows for b = 1.
  batches = rows.batch(b, drop_remainder=True)[process_index::process_count]
  return BatchIterator(batches, grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def make_eval_batches(config, tokenizer, process_index: int = 0, process_count: int = 1,
                      max_batches: int | None = None) -> list[dict]:
  """The held-out rows in order as this process's slices of global batches; the last is padded with mask-0 rows."""
  b, B = _local_batch(config, process_index, process_count), config.batch_size
  tok = tokenizer
  source = grain.sources.ArrayRecordDataSource([prepare_split(config, tok, "eval")])
  n = len(source)
  num = -(-n // B) if max_batches is None else min(max_batches, -(-n // B))
  pad = parse_row(np.zeros((len(FIELDS), config.seq_len), "<i4").tobytes())
  pad["inputs"][:] = pad["targets"][:] = tok.pad_id
  rows = grain.MapDataset.range(num * B).map(lambda g: parse_row(source[g]) if g < n else pad)
  return list(rows.batch(b)[process_index::process_count])
