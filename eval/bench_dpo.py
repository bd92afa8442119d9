"""DPO step time with random weights, on the shape of the TRL reference run.

  python -m eval.bench_dpo [--preset small --batch 8 --prompt_len 64 --completion_len 64 --loss sigmoid]

Batch 8 pairs, prompt 64 + chosen 64 + rejected 64 tokens, beta 0.1, a frozen reference model
(TRL's DPOTrainer: ~1.1-1.2 s/step on the 2-core box of docs/performance.md). A step is exactly the jitted step
train/loop.py runs for `objective=dpo`: policy forward + backward over both completions (one row
[prompt | chosen | rejected] per pair, train/pairs.py), the reference forward, the loss and AdamW.
Median of `steps` timed steps after one warm-up step.

  python -m eval.bench_dpo --pair_rows 8 [--preset small --batch 16 --seq_len 512 --rounds 2]

With --pair_rows R: packed against unpacked pairs, side by side (rounds alternate the two) on a
generated preference jsonl whose pairs vary widely in length, as real ones do (`write_pairs`):
the same stream of pairs (data.pipeline=stream) as batches of one row [prompt | chosen | rejected]
per pair (2 seq_len tokens each) and packed into R rows (data.pair_rows, train/pairs.py `plan`);
for each, the share of padding in the rows, pairs per step, s/step of the DPO train step (with
its reference forward) and real tokens (and pairs) per second.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import dpo_tiny, models
from model import sharding
from model.transformer import ModelConfig, Transformer
from model import tokenizer as tokenizer_lib
from train import corpus, cpu_tuning, loop, objectives, optim, pairs, stream

TRL_SECONDS = 1.15  # TRL s/step, docs/performance.md (midpoint)


def random_pairs(vocab: int, batch: int, prompt_len: int, completion_len: int, seed: int = 0) -> dict:
  """A pairs batch in train/pairs.py's layout: one row [prompt | chosen | rejected] per pair."""
  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(0, vocab, n).tolist()
  ps = pairs.pair_set([(ids(prompt_len), ids(completion_len), ids(completion_len)) for _ in range(batch)], 0)
  return pairs.make_batch(ps, np.arange(batch))


def bench_dpo(preset="small", batch=8, prompt_len=64, completion_len=64, loss="sigmoid", beta=0.1,
              steps=5) -> dict:
  c = dpo_tiny.get_config()
  c.model = models.get(preset)
  c.dpo.loss, c.dpo.beta = loss, beta
  cfg = ModelConfig.from_config(c.model)
  model = Transformer(cfg)
  tx, lr = optim.make_optimizer(c.optim, 1000)
  data = jax.tree.map(jnp.asarray, random_pairs(cfg.vocab_size, batch, prompt_len, completion_len))
  init = jax.jit(lambda k: sharding.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))
  params, ref = init(jax.random.key(0)), init(jax.random.key(0))  # step 0: policy == reference
  opt_state = tx.init(params)
  step = jax.jit(loop.make_train_step(model, objectives.get("dpo"), tx, lr, 1, config=c),
                 donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, data, jnp.int32(0), None, ref).compile()
  compile_s = time.perf_counter() - t0
  params, opt_state, m = compiled(params, opt_state, data, jnp.int32(0), None, ref)
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    params, opt_state, m = compiled(params, opt_state, data, jnp.int32(i + 1), None, ref)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  dt = statistics.median(times)
  return dict(preset=preset, batch=batch, prompt_len=prompt_len, completion_len=completion_len, loss=loss,
              beta=beta, step_s=round(dt, 6), step_min_s=round(min(times), 6), compile_s=round(compile_s, 2),
              tokens_per_sec=round(batch * 2 * (prompt_len + completion_len) / dt, 1),
              trl_s=TRL_SECONDS, speedup_vs_trl=round(TRL_SECONDS / dt, 2),
              train_loss=float(m["train/loss"]), backend=jax.default_backend())


def write_pairs(path: str, n: int = 1500, seed: int = 0) -> None:
  """n pairs {"prompt", "chosen", "rejected"} of words of the built-in prose, their lengths in words
  log-normal (prompt median 40, completions 80, sigma 1): most short, a long tail, as in real sets."""
  words = " ".join(corpus.pretrain_documents(0, 200)).split()
  rng = np.random.default_rng(seed)
  text = lambda median: " ".join(rng.choice(words, max(1, int(rng.lognormal(np.log(median), 1.0)))))
  with open(path, "w") as f:
    for _ in range(n):
      f.write(json.dumps({"prompt": text(40), "chosen": text(80), "rejected": text(80)}) + "\n")


def _step_times(step, state, batches, ref, steps: int, start: int) -> tuple[list, tuple]:
  times = []
  for i in range(steps):
    t = time.perf_counter()
    *state, m = step(*state, batches[(start + i) % len(batches)], jnp.int32(start + i), None, ref)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return times, tuple(state)


def bench_packing(preset="small", batch=16, seq_len=512, pair_rows=8, steps=4, rounds=2, work="") -> dict:
  """Unpacked against packed DPO steps on the same generated pairs (see the module docstring)."""
  work = work or tempfile.mkdtemp(prefix="kiln_bench_pack_")
  path = os.path.join(work, "pairs.jsonl")
  if not os.path.isfile(path):
    write_pairs(path)
  c = dpo_tiny.get_config(preset)
  c.seq_len, c.batch_size = seq_len, batch
  c.data.source, c.data.path, c.data.pipeline, c.data.overlong = "jsonl", path, "stream", "truncate"
  cfg = ModelConfig.from_config(c.model)
  tok = tokenizer_lib.train_tokenizer(corpus.pretrain_documents(0, 2000), cfg.vocab_size,
                                      os.path.join(work, "tok.model"))
  model = Transformer(cfg)
  tx, lr = optim.make_optimizer(c.optim, 1000)
  init = jax.jit(lambda k: sharding.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))
  ref = init(jax.random.key(0))
  runs = {}
  for rows in (0, pair_rows):
    c.data.pair_rows = rows
    it = stream.make_batch_iterator(c, tok)
    batches = [next(it) for _ in range(steps * rounds + 1)]
    it.close()
    real = [float((b["segment_ids"] > 0).sum()) for b in batches]
    params = init(jax.random.key(0))
    data = [jax.tree.map(jnp.asarray, b) for b in batches]
    step = jax.jit(loop.make_train_step(model, objectives.get("dpo"), tx, lr, 1, config=c), donate_argnums=(0, 1))
    state = step(params, tx.init(params), data[0], jnp.int32(0), None, ref)[:2]  # compile + warm-up
    runs[rows] = {"data": data, "state": state, "step": step, "times": [], "real": real,
                  "pairs": [float(b["weight"].sum()) for b in batches], "shape": list(batches[0]["tokens"].shape)}
  for r in range(rounds):   # alternate: both see the same load
    for rows, run in runs.items():
      times, run["state"] = _step_times(run["step"], run["state"], run["data"], ref, steps, 1 + r * steps)
      run["times"] += times
  out = {"preset": preset, "batch": batch, "seq_len": seq_len, "backend": jax.default_backend()}
  for rows, run in runs.items():
    dt, shape = statistics.median(run["times"]), run["shape"]
    name = f"packed_{rows}" if rows else "unpacked"
    out[name] = {"rows_x_len": shape, "padding": round(1 - np.mean(run["real"]) / (shape[0] * shape[1]), 3),
                 "pairs_per_step": round(float(np.mean(run["pairs"])), 2), "step_s": round(dt, 4),
                 "real_tokens_per_s": round(float(np.mean(run["real"])) / dt, 1),
                 "pairs_per_s": round(float(np.mean(run["pairs"])) / dt, 2)}
  out["speedup_pairs_per_s"] = round(out[f"packed_{pair_rows}"]["pairs_per_s"] / out["unpacked"]["pairs_per_s"], 2)
  return out


if __name__ == "__main__":
  cpu_tuning.apply()
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--completion_len", type=int, default=64)
  p.add_argument("--loss", default="sigmoid")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--pair_rows", type=int, default=0, help="> 0: packed into this many rows against unpacked")
  p.add_argument("--seq_len", type=int, default=512, help="with --pair_rows")
  p.add_argument("--rounds", type=int, default=2, help="with --pair_rows: alternations of the two")
  a = p.parse_args()
  if a.pair_rows:
    print(json.dumps(bench_packing(a.preset, a.batch, a.seq_len, a.pair_rows, a.steps, a.rounds)))
  else:
    print(json.dumps(bench_dpo(a.preset, a.batch, a.prompt_len, a.completion_len, a.loss, steps=a.steps)))
