"""Streamed batches (`config.data.pipeline="stream"`): no cache, no pass over the corpus before step 1.

Each process reads its own shard of the train documents (document i of the split goes to process
i % P, sources.shard_documents), tokenizes them as they come and packs them (train/packing.py):
pretraining concatenates and splits (a document that does not fit continues in the next row; the
documents cycle forever, epoch e + 1 starting in the row where epoch e ended), SFT packs each window
of WINDOW conversations best-fit with segment ids (a conversation is never split; one longer than
seq_len is dropped or cut, data.overlong). Rows are shuffled window by window (WINDOW rows, or the
rows of WINDOW conversations; a permutation drawn from (config.seed, process, window)); a process's
batches are its b = B / P rows of every global batch.

The state is where the current window began in the source, (epoch, document, token offset), and
how many of its rows were consumed: a few integers per process. Resume rereads the window from
there, so the batches after it are exactly those of a run that never stopped. With several
processes `get_state` gathers every process's state (a collective: every process saves), so the
checkpoint holds them all and each resumes its own. A TFDS source reads only this process's records
(random access, also when resuming); text and JSONL files are read up to them, tokenizing only this
process's documents.

A background thread prepares the next PREFETCH batches while the device trains. Held-out
batches are the first `config.eval_batches` global batches packed from the eval documents.
"""
import itertools
import queue
import threading

import numpy as np

from configs.errors import UserError
from train import packing
from train import sources

WINDOW = 256   # rows (pretraining) or conversations (SFT) shuffled together
PREFETCH = 4   # batches made ahead by the background thread
FIELDS = ("epoch", "document", "offset", "window", "taken")  # one process's state


def packed_rows(config, tok, pidx: int, pcount: int, epoch: int, document: int, offset: int):
  """Forever: (row [5, seq_len], (epoch, document, offset) where the next row starts), the rows of
  this process's documents from token `offset` of its `document`-th of `epoch` on."""
  seq_len = config.seq_len
  row, fill = packing.empty_row(seq_len, tok.pad_id), 0
  while True:
    whole_epoch, tokens = document == 0, 0
    docs = sources.shard_documents(config, "train", pidx, pcount, document)
    for document, doc in enumerate(docs, document):
      ids = packing.tokenize_document(tok, doc, "pretrain")
      x = packing._shifted(ids)  # [3, n]
      tokens += x.shape[1]
      while offset < x.shape[1]:
        k = min(x.shape[1] - offset, seq_len - fill)
        fill = packing._put(row, fill, x[:, offset:offset + k])
        offset += k
        if fill == seq_len:
          at = (epoch, document, offset) if offset < x.shape[1] else (epoch, document + 1, 0)
          yield row, at
          row, fill = packing.empty_row(seq_len, tok.pad_id), 0
      offset = 0
    if whole_epoch and not tokens:
      raise _no_tokens(config, pidx, pcount)
    epoch, document = epoch + 1, 0


def _no_tokens(config, pidx: int, pcount: int) -> UserError:
  return UserError(f"process {pidx} of {pcount} has no train tokens in {sources.origin(config, 'train')}",
                   hint="give more documents than processes")


def _examples(config, tok, docs):
  """(ids, mask) of documents; SFT conversations longer than seq_len dropped or cut (data.overlong)."""
  d = config.data
  for doc in docs:
    example = packing.tokenize_document(tok, doc, config.objective, d.chat_template, d.train_on_prompt)
    if config.objective == "sft":
      example = packing.fit(example, config.seq_len, sources.overlong(config))[1]
    if example is not None:
      yield example


def concat_windows(config, tok, pidx: int, pcount: int, start: tuple):
  """Forever (pretraining): (WINDOW rows, where they start, where the next ones start)."""
  rows = packed_rows(config, tok, pidx, pcount, *start)
  while True:
    chunk = list(itertools.islice(rows, WINDOW))  # [(row, where the next row starts)]
    yield [r for r, _ in chunk], start, chunk[-1][1]
    start = chunk[-1][1]


def best_fit_windows(config, tok, pidx: int, pcount: int, start: tuple):
  """Forever (SFT): (rows of WINDOW conversations packed best-fit, where they start, where the next
  ones start); a conversation is never split, and no row mixes two windows."""
  epoch, document, _ = start
  while True:
    whole_epoch, kept = document == 0, 0
    docs = sources.shard_documents(config, "train", pidx, pcount, document)
    while block := list(itertools.islice(docs, WINDOW)):
      rows = list(packing.pack_best_fit(_examples(config, tok, block), config.seq_len, tok.pad_id))
      kept += len(rows)
      if rows:
        yield rows, (epoch, document, 0), (epoch, document + len(block), 0)
      document += len(block)
    if whole_epoch and not kept:
      raise _no_tokens(config, pidx, pcount)
    epoch, document = epoch + 1, 0


def shuffled_rows(config, tok, pidx: int, pcount: int, state: tuple):
  """Forever: (row, state after it), the packed rows permuted window by window from `state`."""
  epoch, document, offset, window, taken = state
  windows = concat_windows if config.objective == "pretrain" else best_fit_windows
  for rows, start, end in windows(config, tok, pidx, pcount, (epoch, document, offset)):
    order = np.random.default_rng([config.seed, pidx, window]).permutation(len(rows))
    for j in range(taken, len(rows)):
      after = (*start, window, j + 1) if j + 1 < len(rows) else (*end, window + 1, 0)
      yield rows[order[j]], after
    window, taken = window + 1, 0


def local_batches(config, tok, pidx: int, pcount: int, state: tuple):
  """Forever: ({inputs, targets, segment_ids, positions, loss_mask} each [b, seq_len], state after)."""
  b = config.batch_size // pcount
  rows = shuffled_rows(config, tok, pidx, pcount, state)
  while True:
    taken = list(itertools.islice(rows, b))
    batch = np.stack([r for r, _ in taken])  # [b, 5, seq_len]
    out = {k: batch[:, i] for i, k in enumerate(packing.FIELDS)}
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    yield out, taken[-1][1]


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
  interface (`next`, `get_state`, `set_state`, `describe`, `warning`).

  State: {"step": global batches consumed, "processes": {str(p): [epoch, document, offset, window,
  taken]}} (only this process's entry when JAX runs a single process)."""

  def __init__(self, config, tok, pidx: int, pcount: int):
    if config.batch_size % pcount:
      raise UserError(f"config.batch_size={config.batch_size} is not divisible by the {pcount} processes")
    self._config, self._tok, self._pidx, self._pcount = config, tok, pidx, pcount
    self._prefetch = None
    self.set_state({"step": 0, "processes": {str(pidx): [0] * len(FIELDS)}})

  def describe(self) -> str:
    return (f"streaming {sources.origin(self._config, 'train')} (process {self._pidx} of {self._pcount} "
            f"reads documents i % {self._pcount} == {self._pidx})")

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
    self._step, self._local = int(state["step"]), tuple(int(v) for v in local)
    self._prefetch = _Prefetch(local_batches(self._config, self._tok, self._pidx, self._pcount, self._local))


def make_batch_iterator(config, tok, pidx: int = 0, pcount: int = 1) -> StreamIterator:
  """Endless streamed batches {inputs, targets, segment_ids, positions, loss_mask}, each [b, seq_len]."""
  if config.objective not in ("pretrain", "sft"):
    raise UserError(f"config.data.pipeline='stream' serves config.objective pretrain or sft, not "
                    f"{config.objective!r}", hint="set config.data.pipeline=cache")
  return StreamIterator(config, tok, pidx, pcount)


def make_eval_batches(config, tok, pidx: int = 0, pcount: int = 1) -> list[dict]:
  """The first config.eval_batches (0: all) global batches of packed eval rows, this process's
  slices; the last batch is padded with mask-0 rows."""
  B, b = config.batch_size, config.batch_size // pcount
  examples = _examples(config, tok, sources.iter_documents(config, "eval"))
  rows = packing.pack_rows(examples, config.seq_len, tok.pad_id, split_documents=config.objective == "pretrain")
  rows = [packing.parse_row(packing.row_bytes(r)) for r in itertools.islice(rows, config.eval_batches * B or None)]
  if not rows:
    raise UserError(f"the eval split of {sources.origin(config, 'eval')} has no tokens")
  rows += [packing.padding_row(config.seq_len, tok.pad_id)] * (-len(rows) % B)
  return [{k: np.stack([r[k] for r in rows[s + pidx * b:s + (pidx + 1) * b]]) for k in rows[0]}
          for s in range(0, len(rows), B)]
