"""Streamed batches (`config.data.pipeline="stream"`): no cache, no pass over the corpus before step 1.

Each process reads its own shard of the train records (record i of the split goes to process i % P;
train/shards.py decodes no other record: jsonl / text lines scanned from a byte offset, parquet row
groups and save_to_disk arrow shards read by row, TFDS by index), tokenizes them as they come and
packs them (train/packing.py): pretraining concatenates and splits (a document that does not fit
continues in the next row; the documents cycle forever, epoch e + 1 starting in the row where epoch
e ended), SFT packs each window of WINDOW conversations best-fit with segment ids (a conversation is
never split; one longer than seq_len is dropped or cut, data.overlong). Preference objectives
(reward_model, dpo) take each window of WINDOW records' pairs as the cached pipeline encodes them
(train/pairs.py: one row [prompt | chosen | rejected] per pair, dropped / cut per data.overlong,
chosen == rejected skipped), padded to L = 2 seq_len tokens so that every batch has one shape;
with data.pair_rows, each window's shuffled pairs are planned into batches of at most b pairs
packed into r rows (train/pairs.py `plan`: a pair that fits no row waits for the next batch; the
window's last batches take what waits), and a unit of the stream is one such batch.
Rows are shuffled window by window (WINDOW rows, or the rows of WINDOW records; a permutation drawn
from (config.seed, process, window)); a process's batches are its b = B / P rows of every global batch.

The state is where the current window began in the source, (epoch, document, token offset, seek:
where the reader stopped after the document before), and how many of its rows (packed pairs: its
batches) were consumed: a few integers per process. Resume seeks there and rereads the window, so
the batches after it are exactly those of a run that never stopped, without reading the files
before it again. With several processes `get_state` gathers every process's state (a collective:
every process saves), so the checkpoint holds them all and each resumes its own.

A background thread prepares the next PREFETCH batches while the device trains; with
`data.workers` > 0, worker processes tokenize the records, in order (train/workers.py), so the
batches are the same for any number of workers. Held-out
batches are the first `config.eval_batches` global batches packed from the eval records.
"""
import functools
import itertools
import queue
import threading

import numpy as np

from configs.errors import UserError
from train import packing
from train import pairs
from train import shards
from train import sources
from train import workers

WINDOW = 256   # rows (pretraining) or records (SFT conversations, preference records) shuffled together
PREFETCH = 4   # batches made ahead by the background thread
FIELDS = ("epoch", "document", "offset", "window", "taken", "file", "byte", "line")  # one process's state
OBJECTIVES = ("pretrain", "sft", "reward_model", "dpo")
FIRST = (0, 0, 0, shards.START)  # (epoch, document, offset, seek) of a stream's first row


def _pretrain_example(tok, doc):
  return packing.tokenize_document(tok, doc, "pretrain")


def _sft_example(tok, template: str, train_on_prompt: bool, seq_len: int, overlong: str, doc):
  """(ids, mask) of a conversation, or None when longer than seq_len and dropped (data.overlong)."""
  return packing.fit(packing.tokenize_document(tok, doc, "sft", template, train_on_prompt), seq_len, overlong)[1]


def encoder(config, tok):
  """The function (picklable) of a record: pretrain (ids, mask); sft (ids, mask) or None (dropped);
  preference pairs: the kept (prompt, chosen, rejected) ids of a (where, record) (train/pairs.py)."""
  d = config.data
  if config.objective == "pretrain":
    return functools.partial(_pretrain_example, tok)
  if config.objective == "sft":
    return functools.partial(_sft_example, tok, d.chat_template, d.train_on_prompt, config.seq_len,
                             sources.overlong(config))
  return functools.partial(_pair_rows, tok, config.seq_len, d.chat_template, sources.overlong(config))


def _pair_rows(tok, seq_len: int, template: str, overlong: str, item) -> list[tuple]:
  return pairs.encode_record(tok, seq_len, template, overlong, *item)


def _records(config, split: str, pidx: int, pcount: int, document: int, seek: tuple):
  """(record, after) of this process's shard from its `document`-th on: documents, or (pairs)
  (where, raw record)."""
  if config.objective in ("pretrain", "sft"):
    return sources.shard_documents(config, split, pidx, pcount, document, seek)
  return (((w, rec), after) for w, rec, after in sources.shard_records(config, split, pidx, pcount, document, seek))


def in_thread(config, tok) -> workers.OrderedMap:
  """(encoder(record), after) of (record, after) items, computed in the calling thread."""
  return workers.OrderedMap(encoder(config, tok), 0)


def packed_rows(config, tok, pidx: int, pcount: int, start: tuple, encode=None):
  """Forever: (row [5, seq_len], (epoch, document, offset, seek) where the next row starts), the
  rows of this process's documents from token `offset` of its `document`-th of `epoch` on (`seek`:
  where the reader resumes, after document - 1); `encode`: a workers.OrderedMap of encoder()."""
  encode, seq_len = encode or in_thread(config, tok), config.seq_len
  epoch, document, offset, seek = start
  row, fill = packing.empty_row(seq_len, tok.pad_id), 0
  while True:
    whole_epoch, tokens = document == 0, 0
    examples = encode(_records(config, "train", pidx, pcount, document, seek))
    for document, (example, after) in enumerate(examples, document):
      x = packing._shifted(example)  # [3, n]
      tokens += x.shape[1]
      while offset < x.shape[1]:
        k = min(x.shape[1] - offset, seq_len - fill)
        fill = packing._put(row, fill, x[:, offset:offset + k])
        offset += k
        if fill == seq_len:
          at = (epoch, document, offset, seek) if offset < x.shape[1] else (epoch, document + 1, 0, after)
          yield row, at
          row, fill = packing.empty_row(seq_len, tok.pad_id), 0
      offset, seek = 0, after
    if whole_epoch and not tokens:
      raise _no_tokens(config, pidx, pcount)
    epoch, document, seek = epoch + 1, 0, shards.START


def _no_tokens(config, pidx: int, pcount: int) -> UserError:
  return UserError(f"process {pidx} of {pcount} has no train tokens in {sources.origin(config, 'train')}",
                   hint="give more documents than processes")


def concat_windows(config, tok, pidx: int, pcount: int, start: tuple, encode=None):
  """Forever (pretraining): (WINDOW rows, where they start, where the next ones start)."""
  rows = packed_rows(config, tok, pidx, pcount, start, encode)
  while True:
    chunk = list(itertools.islice(rows, WINDOW))  # [(row, where the next row starts)]
    yield [r for r, _ in chunk], start, chunk[-1][1]
    start = chunk[-1][1]


def _pack(config, tok, encoded_block: list) -> list:
  """SFT: the rows [5, seq_len] of a window's conversations packed best-fit; pairs: its kept pairs."""
  if config.objective == "sft":
    examples = (x for x in encoded_block if x is not None)
    return list(packing.pack_best_fit(examples, config.seq_len, tok.pad_id))
  return [triple for triples in encoded_block for triple in triples]


def record_windows(config, tok, pidx: int, pcount: int, start: tuple, encode=None):
  """Forever (SFT, pairs): (rows of WINDOW records, where they start, where the next ones start);
  a conversation is never split, and no row mixes two windows."""
  epoch, document, _, seek = start
  encode = encode or in_thread(config, tok)
  while True:
    whole_epoch, kept = document == 0, 0
    items = encode(_records(config, "train", pidx, pcount, document, seek))
    while block := list(itertools.islice(items, WINDOW)):
      rows = _pack(config, tok, [x for x, _ in block])
      kept += len(rows)
      end = (epoch, document + len(block), 0, block[-1][1])
      if rows:
        yield rows, (epoch, document, 0, seek), end
      document, seek = end[1], end[3]
    if whole_epoch and not kept:
      raise _no_tokens(config, pidx, pcount)
    epoch, document, seek = epoch + 1, 0, shards.START


def _state(at: tuple, window: int, taken: int) -> tuple:
  epoch, document, offset, seek = at
  return (epoch, document, offset, window, taken, *seek)


FIRST_STATE = _state(FIRST, 0, 0)


def shuffled_rows(config, tok, pidx: int, pcount: int, state: tuple, encode=None):
  """Forever: (row, state after it), the packed rows permuted window by window from `state`; with
  data.pair_rows, (batch of packed pairs, state after it): a window's permuted pairs planned into
  batches (train/pairs.py `plan`)."""
  epoch, document, offset, window, taken, *seek = state
  windows = concat_windows if config.objective == "pretrain" else record_windows
  pack = _pair_packing(config, pcount)
  for rows, start, end in windows(config, tok, pidx, pcount, (epoch, document, offset, tuple(seek)), encode):
    order = np.random.default_rng([config.seed, pidx, window]).permutation(len(rows))
    units = [rows[i] for i in order]
    if pack:
      sizes = [sum(map(len, triple)) for triple in units]
      units = [[[units[i] for i in group] for group in groups] for groups in pairs.plan(sizes, pack)]
    for j in range(taken, len(units)):
      after = _state(start, window, j + 1) if j + 1 < len(units) else _state(end, window + 1, 0)
      yield units[j], after
    window, taken = window + 1, 0


def pair_sizes(config) -> tuple[int, int]:
  """(L, K): tokens of a streamed pair row and its target slots, fixed by seq_len (a row holds any
  pair: train/pairs.py pair_row_len)."""
  n = pairs.pair_row_len(config.seq_len)
  return n, n


def _pair_packing(config, pcount: int):
  """train/pairs.py Packing of a preference objective with data.pair_rows, else None."""
  return None if config.objective in ("pretrain", "sft") else pairs.Packing.of(config, pcount)


def _batch(config, tok, rows: list, pack=None) -> dict:
  """Rows of one process's batch as the trainer takes them: packed rows or pairs (train/pairs.py);
  with `pack` (pairs.Packing), `rows` is one batch: its rows' lists of pairs."""
  if config.objective in ("pretrain", "sft"):
    batch = np.stack(rows)  # [b, 5, seq_len]
    out = {k: batch[:, i] for i, k in enumerate(packing.FIELDS)}
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    return out
  L, K = pair_sizes(config)
  if pack:
    ps = pairs.pair_set([t for group in rows for t in group], tok.pad_id, row_len=L, completions=K)
    starts = np.cumsum([0] + [len(group) for group in rows])
    groups = [list(range(a, z)) for a, z in zip(starts[:-1], starts[1:])]
    return pairs.packed_batch(ps, groups, pack.per_row, L, K)
  return pairs.make_batch(pairs.pair_set(rows, tok.pad_id, row_len=L, completions=K), np.arange(len(rows)))


def local_batches(config, tok, pidx: int, pcount: int, state: tuple, encode=None):
  """Forever: (this process's batch, state after it): {inputs, targets, segment_ids, positions,
  loss_mask} each [b, seq_len], or a batch of b pairs (train/pairs.py make_batch, L = 2 seq_len),
  or with data.pair_rows at most b pairs packed into r rows (train/pairs.py packed_batch)."""
  pack = _pair_packing(config, pcount)
  b = 1 if pack else config.batch_size // pcount  # units per batch
  rows = shuffled_rows(config, tok, pidx, pcount, state, encode)
  while True:
    taken = list(itertools.islice(rows, b))
    yield _batch(config, tok, taken[0][0] if pack else [r for r, _ in taken], pack), taken[-1][1]


class _Prefetch:
  """Runs a generator in a daemon thread, PREFETCH items ahead; `close` stops it."""

  def __init__(self, items):
    self._queue, self._stop = queue.Queue(PREFETCH), threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(items,), daemon=True)
    self._thread.start()

  def _fill(self, items):
    try:
      for item in items:
        while not self._stop.is_set():
          try:
            self._queue.put((item, None), timeout=0.1)
            break
          except queue.Full:
            pass
        if self._stop.is_set():
          return
    except BaseException as e:  # raised again in the trainer's thread
      self._queue.put((None, e))

  def get(self):
    item, error = self._queue.get()
    if error is not None:
      raise error
    return item

  def close(self):
    self._stop.set()
    self._thread.join()


def _gather(local: list, pcount: int) -> list:
  """[pcount][len(FIELDS)]: every process's state (a collective when several processes run)."""
  import jax
  if jax.process_count() == 1:
    return [local]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(local, np.int64))).reshape(pcount, -1).tolist()


class StreamIterator:
  """This process's slices of the global train batches, streamed forever; the trainer's iterator
  interface (`next`, `get_state`, `set_state`, `describe`, `warning`; pairs: `row_len`, `rows`).

  State: {"step": global batches consumed, "processes": {str(p): [epoch, document, offset, window,
  taken, file, byte, line]}} (only this process's entry when JAX runs a single process)."""

  def __init__(self, config, tok, pidx: int, pcount: int):
    if config.batch_size % pcount:
      raise UserError(f"config.batch_size={config.batch_size} is not divisible by the {pcount} processes")
    self._config, self._tok, self._pidx, self._pcount = config, tok, pidx, pcount
    self.row_len = pair_sizes(config)[0]  # L of a pair row (preference objectives)
    self.rows = config.data.get("pair_rows", 0) or config.batch_size  # pair rows of a global batch
    self._encode = workers.OrderedMap(encoder(config, tok), config.data.get("workers", 0))
    self._prefetch = None
    self.set_state({"step": 0, "processes": {str(pidx): FIRST_STATE}})

  def describe(self) -> str:
    what = "documents" if self._config.objective in ("pretrain", "sft") else "records of pairs"
    return (f"streaming {sources.origin(self._config, 'train')} (process {self._pidx} of {self._pcount} "
            f"reads {what} i % {self._pcount} == {self._pidx})")

  def warning(self) -> str:
    return ""

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch, self._local = self._prefetch.get()
    self._step += 1
    return batch

  def get_state(self) -> dict:
    states = _gather(list(self._local), self._pcount)
    pids = range(self._pcount) if len(states) > 1 else [self._pidx]
    return {"step": self._step, "processes": {str(p): s for p, s in zip(pids, states)}}

  def set_state(self, state: dict) -> None:
    local = state.get("processes", {}).get(str(self._pidx))
    if local is None:
      raise UserError(f"the checkpoint's data state {state} has no stream position of process {self._pidx} "
                      f"of {self._pcount}", hint="resume a streamed run with the process count it saved with")
    if self._prefetch is not None:
      self._prefetch.close()
    if len(local) == 5:  # saved before the state held a seek: scan the files from the start
      local = [*local, *shards.NO_SEEK]
    self._step, self._local = int(state["step"]), tuple(int(v) for v in local)
    self._prefetch = _Prefetch(local_batches(self._config, self._tok, self._pidx, self._pcount, self._local,
                                             self._encode))

  def close(self) -> None:
    """Stops the background thread and the worker processes."""
    self._prefetch.close()
    self._encode.close()


def check(config) -> None:
  """UserError when config.data.pipeline='stream' cannot serve the config."""
  d = config.data
  if config.objective not in OBJECTIVES:
    raise UserError(f"config.data.pipeline='stream' serves config.objective {' | '.join(OBJECTIVES)}, not "
                    f"{config.objective!r}", hint="set config.data.pipeline=cache")
  if config.objective in ("pretrain", "sft"):
    return
  if d.source not in ("jsonl", "parquet", "hf_disk"):
    raise UserError(f"config.data.pipeline='stream' reads preference pairs from files: config.data.source "
                    f"jsonl | parquet | hf_disk, not {d.source!r}", hint="set config.data.pipeline=cache")
  if config.get("dpo") and config.dpo.get("precompute_reference"):
    raise UserError("config.dpo.precompute_reference scores every pair before training: not with "
                    "config.data.pipeline='stream'", hint="set config.dpo.precompute_reference=false")


def make_batch_iterator(config, tok, pidx: int = 0, pcount: int = 1) -> StreamIterator:
  """Endless streamed batches: {inputs, targets, segment_ids, positions, loss_mask}, each [b, seq_len],
  or (preference objectives) batches of b pairs."""
  check(config)
  return StreamIterator(config, tok, pidx, pcount)


def make_eval_batches(config, tok, pidx: int = 0, pcount: int = 1) -> list[dict]:
  """The first config.eval_batches (0: all) global batches of packed eval rows (or pairs), this
  process's slices; the last batch is padded with mask-0 rows (weight-0 pairs)."""
  B, b = config.batch_size, config.batch_size // pcount
  items = in_thread(config, tok)(_records(config, "eval", 0, 1, 0, shards.START))
  if config.objective not in ("pretrain", "sft"):
    triples = list(itertools.islice((t for ts, _ in items for t in ts), config.eval_batches * B or None))
    if not triples:
      raise UserError(f"the eval split of {sources.origin(config, 'eval')} has no pairs")
    return pairs.ordered_batches(pairs.pair_set(triples, tok.pad_id), B, pidx, pcount)
  examples = (x for x, _ in items if x is not None)
  rows = packing.pack_rows(examples, config.seq_len, tok.pad_id, split_documents=config.objective == "pretrain")
  rows = [packing.parse_row(packing.row_bytes(r)) for r in itertools.islice(rows, config.eval_batches * B or None)]
  if not rows:
    raise UserError(f"the eval split of {sources.origin(config, 'eval')} has no tokens")
  rows += [packing.padding_row(config.seq_len, tok.pad_id)] * (-len(rows) % B)
  return [{k: np.stack([r[k] for r in rows[s + pidx * b:s + (pidx + 1) * b]]) for k in rows[0]}
          for s in range(0, len(rows), B)]
