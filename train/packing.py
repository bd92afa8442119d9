"""Packing: documents -> (ids, mask) examples -> rows of seq_len tokens, and their bytes on disk.

A row is int32 [5, seq_len] in FIELDS order: inputs, targets, segment_ids (1, 2, ... per
piece of a document in the row; 0 = padding), positions (0.. per piece), loss_mask. An
example (ids, mask) of n + 1 tokens gives inputs=ids[:-1], targets=ids[1:],
loss_mask=mask[1:]: n positions, cut into pieces that each become one segment.

Two packers (`pack_rows` picks one):
- concatenate and split (pretraining): pieces fill every row to the last position; a
  document that does not fit ends the current row and continues in the next ones.
  Only the final row has padding.
- best fit from a buffer (SFT): a conversation is never split; one longer than seq_len is
  dropped or cut to its first seq_len positions first (`fit`, config.data.overlong). Pieces
  wait in a buffer of `buffer` pending pieces; each row takes the oldest one, then the
  longest ones that still fit. Memory stays O(buffer * seq_len) for any number of
  documents, and on short conversations the fill is within a fraction of a percent of
  first-fit-decreasing over the whole split.
"""
import bisect
import collections
import itertools
import math

import numpy as np

from model import tokenizer as tokenizer_lib

FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PACK_VERSION = 3  # bump when rows change for the same documents (it is in every cache key)
BUFFER = 256  # pending pieces the SFT packer chooses from


def tokenize_document(tok, doc, objective: str, chat_template: str = "chatml",
                      train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
  """(ids, mask) of a document: bos+text+eos with mask 1 (pretrain), or chat ids + assistant mask (sft)."""
  if objective == "pretrain":
    ids = tok.encode(doc, add_bos=True, add_eos=True)
    return ids, [1] * len(ids)
  ids, mask = tokenizer_lib.apply_chat_template(tok, doc, chat_template)
  return ids, ([1] * len(ids) if train_on_prompt else mask)


def _shifted(example) -> np.ndarray:
  """(ids, mask) -> int32 [3, n]: inputs, targets, loss_mask of the n predicted positions."""
  ids_mask = np.array(example, np.int32).reshape(2, -1)  # [2, n + 1]
  out = np.empty((3, max(0, ids_mask.shape[1] - 1)), np.int32)  # [3, n]
  if out.shape[1]:
    out[0], out[1], out[2] = ids_mask[0, :-1], ids_mask[0, 1:], ids_mask[1, 1:]
  return out


def empty_row(seq_len: int, pad_id: int) -> np.ndarray:
  row = np.zeros((len(FIELDS), seq_len), np.int32)  # [5, seq_len]
  row[:2] = pad_id
  return row


def _put(row: np.ndarray, fill: int, piece: np.ndarray) -> int:
  """Writes piece [3, k] at row[:, fill:fill+k] as a new segment; returns the new fill."""
  k = piece.shape[1]
  span = slice(fill, fill + k)
  row[0, span], row[1, span], row[4, span] = piece
  row[2, span] = (row[2, fill - 1] if fill else 0) + 1
  row[3, span] = np.arange(k)
  return fill + k


def pack_concat(examples, seq_len: int, pad_id: int = 0):
  """Concatenate-and-split packing; yields full rows [5, seq_len], the last one padded."""
  row, fill = empty_row(seq_len, pad_id), 0
  for example in examples:
    x = _shifted(example)  # [3, n]
    start = 0
    while start < x.shape[1]:
      k = min(x.shape[1] - start, seq_len - fill)
      fill = _put(row, fill, x[:, start:start + k])
      start += k
      if fill == seq_len:
        yield row
        row, fill = empty_row(seq_len, pad_id), 0
  if fill:
    yield row


def fit(example, seq_len: int, overlong: str):
  """(what became of an SFT example (ids, mask), the example or None): an example of n + 1 tokens
  with n <= seq_len predicted positions is "kept"; a longer one is "dropped" (overlong "drop"), or
  "truncated" to its first seq_len + 1 tokens ("truncate"; "dropped" if no loss token is left)."""
  ids, mask = example
  if len(ids) - 1 <= seq_len:
    return "kept", example
  if overlong == "drop" or not any(mask[1:seq_len + 1]):
    return "dropped", None
  return "truncated", (ids[:seq_len + 1], mask[:seq_len + 1])


def _pieces(examples, seq_len: int):
  """Yields each non-empty example as a piece [3, n], n <= seq_len (longer: ValueError, `fit` first)."""
  for example in examples:
    x = _shifted(example)  # [3, n]
    if x.shape[1] > seq_len:
      raise ValueError(f"an example of {x.shape[1]} positions does not fit in a row of {seq_len}: fit() it")
    if x.shape[1]:
      yield x


def pack_best_fit(examples, seq_len: int, pad_id: int = 0, buffer: int = BUFFER):
  """Greedy packing of examples of at most seq_len positions from a buffer of pending pieces;
  yields rows [5, seq_len].

  Each row takes the oldest pending piece (so none waits more than `buffer` rows), then
  the longest pending pieces that still fit. buffer=1 gives every piece its own row.
  """
  pending = []  # sorted (length, arrival, piece [3, k])
  arrivals = collections.deque()  # (length, arrival) of pending and placed pieces, oldest first
  placed = set()  # arrivals already in a row but not yet dropped from `arrivals`
  stream = itertools.chain(enumerate(_pieces(examples, seq_len)), [(None, None)])
  for arrival, piece in stream:
    if piece is not None:
      bisect.insort(pending, (piece.shape[1], arrival, piece))
      arrivals.append((piece.shape[1], arrival))
    while pending and (len(pending) >= buffer or piece is None):
      while arrivals[0][1] in placed:
        placed.remove(arrivals.popleft()[1])
      oldest = arrivals.popleft()
      row = empty_row(seq_len, pad_id)
      fill = _put(row, 0, pending.pop(bisect.bisect_left(pending, oldest))[2])
      while (j := bisect.bisect_right(pending, (seq_len - fill, math.inf)) - 1) >= 0:
        k, a, p = pending.pop(j)
        fill = _put(row, fill, p)
        placed.add(a)
      yield row


def pack_rows(examples, seq_len: int, pad_id: int = 0, split_documents: bool = False,
              buffer: int = BUFFER):
  """Rows [5, seq_len] of (ids, mask) examples: concat-and-split if split_documents, else best fit."""
  if split_documents:
    return pack_concat(examples, seq_len, pad_id)
  return pack_best_fit(examples, seq_len, pad_id, buffer)


def row_bytes(row: np.ndarray) -> bytes:
  """A row [5, seq_len] as the little-endian int32 record stored on disk."""
  return np.asarray(row).astype("<i4").tobytes()


def parse_row(record: bytes) -> dict:
  """One stored row -> {inputs, targets, segment_ids, positions: int32, loss_mask: float32}, each [seq_len]."""
  row = np.frombuffer(record, "<i4").reshape(len(FIELDS), -1)  # [5, seq_len]
  out = {k: row[i].astype(np.int32) for i, k in enumerate(FIELDS)}
  out["loss_mask"] = out["loss_mask"].astype(np.float32)
  return out


def padding_row(seq_len: int, pad_id: int) -> dict:
  """An all-padding row as parse_row returns it (segment 0, loss_mask 0)."""
  return parse_row(row_bytes(empty_row(seq_len, pad_id)))
