"""A function mapped over a stream in worker processes, results in input order (`config.data.workers`).

The streaming pipeline (train/stream.py) tokenizes records here: each worker is a fresh
interpreter (multiprocessing's "spawn": no copy of the trainer's threads or devices) given the
function once at start, and takes CHUNK items at a time; at most AHEAD chunks per worker are in
flight, so memory stays bounded on any corpus. Results come back in the order of the input, so the
batches are the same for any number of workers (0: the function runs in the caller's thread).
"""
import collections
import concurrent.futures
import itertools
import multiprocessing

CHUNK = 32  # items per task
AHEAD = 4   # tasks in flight per worker

_fn = None  # the function of this worker process


def _start(fn) -> None:
  global _fn
  _fn = fn


def _apply(items: list) -> list:
  return [_fn(x) for x in items]


class OrderedMap:
  """fn over iterables in `workers` processes (0: in this thread), in order; `close` ends them."""

  def __init__(self, fn, workers: int):
    self.fn, self.workers = fn, workers
    self._pool = None
    if workers:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start, initargs=(fn,))

  def __call__(self, items):
    """Yields (fn(x), tag) for each (x, tag) of `items` (tags stay in this process)."""
    if self._pool is None:
      yield from ((self.fn(x), tag) for x, tag in items)
      return
    items, pending = iter(items), collections.deque()  # (future, tags) of chunks in input order
    while True:
      while len(pending) < AHEAD * self.workers and (chunk := list(itertools.islice(items, CHUNK))):
        pending.append((self._pool.submit(_apply, [x for x, _ in chunk]), [t for _, t in chunk]))
      if not pending:
        return
      future, tags = pending.popleft()
      yield from zip(future.result(), tags)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
