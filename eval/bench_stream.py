"""The streaming input pipeline (train/stream.py) on generated jsonl corpora of growing size.

For each size (MB): a fresh data cache, then `python -m train` (the `small` model, 8 x 256 tokens,
data.pipeline=stream) for one step, timed from launch to exit (tokenizer training on the bounded
sample, compile, the first step, a save), and the data cache's bytes afterwards; then, in this
process, the rate at which the stream makes batches of the first corpus (tokenize + pack +
shuffle) with each `data.workers` count of --workers (0: one thread), against what a `small` train
step consumes (eval/bench.py `train_small`).

  python -m eval.bench_stream [--sizes 25,250] [--dir /tmp/kiln_bench_stream] [--pipeline cache] [--workers 0,2]
      [--rounds 3]   (the worker counts alternated, median rates and their ratio)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(path: str, megabytes: float, seed: int = 0) -> None:
  """Documents of 200-4000 characters of words drawn from the built-in prose, `megabytes` in all."""
  from train import corpus
  words = np.array(" ".join(corpus.pretrain_documents(0, 500)).split())
  rng = np.random.default_rng(seed)
  size, target = 0, megabytes * 1e6
  with open(path, "w") as f:
    while size < target:
      n = rng.integers(30, 600, 256)  # words per document
      picked = words[rng.integers(0, len(words), n.sum())]
      for doc in np.split(picked, np.cumsum(n)[:-1]):
        line = json.dumps({"text": " ".join(doc)}) + "\n"
        f.write(line)
        size += len(line)


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def first_step(corpus_path: str, work: str, pipeline: str = "stream") -> dict:
  """Seconds from launch to the end of a one-step streamed run, and the data cache's bytes."""
  shutil.rmtree(work, ignore_errors=True)
  cache = os.path.join(work, "cache")
  cmd = [sys.executable, "-m", "train", "--config", os.path.join(ROOT, "configs/pretrain_tiny.py:small"),
         "--workdir", os.path.join(work, "run"), f"--config.data.cache_dir={cache}",
         "--config.data.source=jsonl", f"--config.data.path={corpus_path}", f"--config.data.pipeline={pipeline}",
         "--config.steps=1", "--config.eval_every=0", "--config.seq_len=256", "--config.batch_size=8",
         "--config.log_every=1"]
  t0 = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if out.returncode:
    raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
  return {"first_step_s": seconds, "cache_bytes": du(cache)}


def stream_rate(corpus_path: str, work: str, batches: int = 200, workers: int = 0) -> float:
  """Tokens per second of streamed `small` batches (8 x 256), after the first (which waits for the
  workers to start)."""
  from configs import pretrain_tiny
  from train import run_tokenizer, stream
  c = pretrain_tiny.get_config("small")
  c.data.source, c.data.path, c.data.pipeline = "jsonl", corpus_path, "stream"
  c.seq_len, c.batch_size, c.data.workers = 256, 8, workers
  it = stream.make_batch_iterator(c, run_tokenizer.load(os.path.join(work, "run"), c))
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  it.close()
  return batches * c.seq_len * c.batch_size / seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="25,250")
  parser.add_argument("--dir", default="/tmp/kiln_bench_stream")
  parser.add_argument("--pipeline", default="stream", help="cache: the same runs on cached rows, to compare")
  parser.add_argument("--workers", default="0", help="data.workers counts of the stream's rate, e.g. 0,2")
  parser.add_argument("--rounds", type=int, default=1, help="alternations of the worker counts (median rates)")
  args = parser.parse_args()
  rows = []
  for mb in [float(s) for s in args.sizes.split(",")]:
    work = os.path.join(args.dir, f"{mb:g}mb")
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"corpus_{mb:g}mb.jsonl")
    if not os.path.isfile(path):
      write_corpus(path, mb)
    row = {"corpus_mb": os.path.getsize(path) / 1e6, **first_step(path, work, args.pipeline)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.pipeline != "stream":
    return
  first = os.path.join(args.dir, f"{float(args.sizes.split(',')[0]):g}mb")
  counts = [int(w) for w in args.workers.split(",")]
  rates = {n: [] for n in counts}
  for _ in range(args.rounds):   # the worker counts alternate: each round sees the same load
    for n in counts:
      rates[n].append(stream_rate(os.path.join(args.dir, f"corpus_{float(args.sizes.split(',')[0]):g}mb.jsonl"),
                                  first, workers=n))
      print(json.dumps({"workers": n, "stream_tokens_per_s": rates[n][-1]}), flush=True)
  if len(counts) > 1:
    base = np.median(rates[counts[0]])
    print(json.dumps({f"workers_{n}_over_{counts[0]}": float(np.median(rates[n]) / base) for n in counts[1:]}))
  if len(rows) > 1:
    print(json.dumps({"first_step_ratio": rows[-1]["first_step_s"] / rows[0]["first_step_s"]}))


if __name__ == "__main__":
  main()
