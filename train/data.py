"""Data for pretraining and SFT: documents -> tokens -> packed rows on disk -> grain batches.

Documents come from train/sources.py (`config.data.source`: builtin, text, jsonl, tfds)
and are packed by train/packing.py: pretraining concatenates documents and splits them
at row ends (every row full but the last), SFT packs whole conversations best-fit; one
longer than seq_len is dropped or cut to fit (config.data.overlong), and counted.

Preparation streams: documents are read, tokenized, packed and written one at a time, so
a split never has to fit in memory. It runs once per (documents, tokenizer, seq_len,
objective, template, overlong, PACK_VERSION) and is cached in
`data.cache_dir/packed/<key>/rows.array_record` (one record per row, int32 [5, seq_len],
see packing.FIELDS) next to meta.json (rows, documents, dropped, truncated, tokens, fill),
which the train iterator's `describe` and `warning` report. The key of the
builtin corpus hashes its documents (generated, cheap); files and TFDS splits are keyed
by names, sizes and mtimes (sources.fingerprint), never by reading them.

The tokenizer (config.tokenizer.path '' = train one) is trained on the first
`tokenizer.max_training_chars` characters of the training documents, cached likewise; a run
keeps the one it started with in DIR/tokenizer/ (train/run_tokenizer.py), never rebuilding it.

Batches: the train rows are shuffled per epoch with config.seed (forever). Global batch s
is shuffled rows [s*B, (s+1)*B); process p of P gets rows [s*B + p*b, s*B + (p+1)*b) with
b = B // P, so any P sees the same global batches. Iterator state = {"step": s}.
"""
import hashlib
import json
import os
import shutil
import tempfile

from array_record.python import array_record_module
import grain
import numpy as np

from configs import sections
from configs.errors import UserError
from model import hf_tokenizer
from model import tokenizer as tokenizer_lib
from train import corpus, files
from train import packing
from train import sources

# ----------------------------------------------------------------------------- tokenizer


def _doc_text(doc) -> str:
  """A document as plain text (tokenizer training)."""
  return doc if isinstance(doc, str) else "\n".join(f"{m['role']}\n{m['content']}" for m in doc)


def first_chars(texts, max_chars: int):
  """Yields texts until max_chars characters in all (the last one cut); max_chars 0 = all."""
  left = max_chars or float("inf")
  for t in texts:
    if left <= 0:
      return
    yield t[:left] if len(t) > left else t
    left -= len(t)


def _tokenizer_texts(config):
  """(texts to train on, their cache identity): the builtin corpus is hashed, files are not read."""
  cap = config.tokenizer.get("max_training_chars", sections.TOKENIZER_TRAINING_CHARS)
  if config.data.source == "builtin":  # one builtin tokenizer for pretrain and sft alike
    docs = corpus.pretrain_documents(sources.BUILTIN_SEED, sources.BUILTIN_TOKENIZER_PROBLEMS)
    texts = list(first_chars(docs, cap))
    return texts, texts
  docs = sources.iter_documents(config, "train")
  texts = first_chars((_doc_text(doc) for doc in docs), cap)
  return texts, ["tokenizer", sources.fingerprint(config, "train"), cap]


def load_or_train_tokenizer(config) -> tokenizer_lib.Tokenizer:
  """config.tokenizer.path, or a tokenizer trained on the training corpus (cached)."""
  vocab = config.model.get("vocab_size") if "model" in config else None
  if config.tokenizer.path:
    tok = hf_tokenizer.load_tokenizer(files.local(config.tokenizer.path))  # a gs:// one: downloaded
  else:
    if not vocab:
      raise ValueError("config.model.vocab_size is needed to train a tokenizer (config.tokenizer.path is '')")
    if config.data.source != "builtin" and config.objective not in ("pretrain", "sft"):
      raise UserError(f"config.objective={config.objective!r} trains no tokenizer on its "
                      f"config.data.source={config.data.source!r} data",
                      "start from a run (config.init_from: its tokenizer) or give config.tokenizer.path")
    texts, identity = _tokenizer_texts(config)
    name = f"{sources.stable_hash(identity, vocab)}-{vocab}.model"
    path = os.path.join(sources.cache_dir(config), "tokenizers", name)
    if os.path.isfile(path):
      tok = hf_tokenizer.load_tokenizer(path)
    else:
      tok = tokenizer_lib.train_tokenizer(texts, vocab, path)
  if vocab and tok.vocab_size > vocab:
    raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces > config.model.vocab_size={vocab}")
  return tok


# ----------------------------------------------------------------------------- preparation


def _documents_and_identity(config, split: str):
  """(documents of a split, what they depend on): builtin documents are generated and hashed."""
  if config.data.source == "builtin":
    docs = sources.load_documents(config, split)
    return docs, sources.stable_hash(docs)
  return sources.iter_documents(config, split), sources.fingerprint(config, split)


def _overlong(config) -> str:
  """data.overlong for SFT; "" for pretraining, whose documents are always split."""
  return sources.overlong(config) if config.objective == "sft" else ""


def _split_key(config, tok, split: str, identity) -> str:
  d = config.data
  return sources.stable_hash(
      packing.PACK_VERSION, d.source, config.objective, split, config.seq_len, d.num_documents,
      tokenizer_lib.template_key(tok, d.chat_template), bool(d.train_on_prompt), _overlong(config),
      hashlib.sha1(tok.model_proto).hexdigest(), identity)


def _write_rows(path: str, rows) -> dict:
  """Writes rows [5, seq_len] to an array_record file as they come; returns their counts."""
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  stats = dict(rows=0, tokens=0, loss_tokens=0)
  try:
    for row in rows:
      writer.write(packing.row_bytes(row))
      stats["rows"] += 1
      stats["tokens"] += int((row[2] > 0).sum())
      stats["loss_tokens"] += int(row[4].sum())
  finally:
    writer.close()
  return stats


def prepare_split(config, tokenizer, split: str) -> str:
  """Tokenizes and packs a split once, streaming; returns the cached rows.array_record path."""
  d, tok, seq_len, overlong = config.data, tokenizer, config.seq_len, _overlong(config)
  docs, identity = _documents_and_identity(config, split)
  key = _split_key(config, tok, split, identity)
  final = os.path.join(sources.cache_dir(config), "packed", key)
  path = os.path.join(final, "rows.array_record")
  if os.path.isfile(path):
    return path
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f".{key}.")
  count = {"documents": 0, "dropped": 0, "truncated": 0}

  def examples():
    for doc in docs:
      count["documents"] += 1
      example = packing.tokenize_document(tok, doc, config.objective, d.chat_template, d.train_on_prompt)
      if overlong:  # sft
        fate, example = packing.fit(example, seq_len, overlong)
        if fate != "kept":
          count[fate] += 1
      if example is not None:
        yield example

  try:
    rows = packing.pack_rows(examples(), seq_len, tok.pad_id,
                             split_documents=config.objective == "pretrain")
    stats = _write_rows(os.path.join(tmp, "rows.array_record"), rows)
    split_counts(config, split, count).check(sources.origin(config, split))
    if stats["rows"] == 0:
      raise UserError(f"the {split} split of {sources.origin(config, split)} has no tokens")
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(dict(stats, split=split, seq_len=seq_len, fill=stats["tokens"] / (stats["rows"] * seq_len),
                     **count), f)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  sources.publish(tmp, final)
  return path


def split_counts(config, split: str, meta: dict) -> sources.Counts:
  """The documents of a split (meta.json of its rows) as Counts: read, dropped, cut to seq_len."""
  what = f"{split} " + ("conversations" if config.objective == "sft" else "documents")
  return sources.Counts(what, f"config.seq_len={config.seq_len}", _overlong(config) or "drop",
                        meta["documents"], meta.get("dropped", 0), meta.get("truncated", 0))


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


def _meta(rows_path: str) -> dict:
  with open(os.path.join(os.path.dirname(rows_path), "meta.json")) as f:
    return json.load(f)


class BatchIterator:
  """This process's slices of the global train batches, forever; state = global batches consumed.
  `counts`: what became of the split's documents (sources.Counts), for the start line."""

  def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions,
               counts: sources.Counts):
    self._batches, self._read_options, self.counts = batches, read_options, counts
    self.set_state({"step": 0})

  def describe(self) -> str:
    return self.counts.note()

  def warning(self) -> str:
    return self.counts.warning()

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
  path = prepare_split(config, tokenizer, split)
  rows = grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path]))
  rows = rows.shuffle(seed).repeat().map(packing.parse_row)
  # Batch s*P + p = rows [s*B + p*b, s*B + (p+1)*b). drop_remainder=True because grain
  # sizes a batched infinite dataset with math.ceil(float), which overflows for b = 1.
  batches = rows.batch(b, drop_remainder=True)[process_index::process_count]
  return BatchIterator(batches, grain.ReadOptions(num_threads=2, prefetch_buffer_size=4),
                       split_counts(config, split, _meta(path)))


def make_eval_batches(config, tokenizer, process_index: int = 0, process_count: int = 1,
                      max_batches: int | None = None) -> list[dict]:
  """The held-out rows in order as this process's slices of global batches; the last is padded with mask-0 rows."""
  b, B = _local_batch(config, process_index, process_count), config.batch_size
  tok = tokenizer
  source = grain.sources.ArrayRecordDataSource([prepare_split(config, tok, "eval")])
  n = len(source)
  num = -(-n // B) if max_batches is None else min(max_batches, -(-n // B))
  pad = packing.padding_row(config.seq_len, tok.pad_id)
  rows = grain.MapDataset.range(num * B).map(lambda g: packing.parse_row(source[g]) if g < n else pad)
  return list(rows.batch(b)[process_index::process_count])
