"""DPO step time with random weights, on the shape of the TRL reference run.

  python -m eval.bench_dpo [--preset small --batch 8 --prompt_len 64 --completion_len 64 --loss sigmoid]

Batch 8 pairs, prompt 64 + chosen 64 + rejected 64 tokens, beta 0.1, a frozen reference model
(TRL's DPOTrainer: ~1.1-1.2 s/step on the 2-core box of docs/performance.md). A step is exactly the jitted step
train/loop.py runs for `objective=dpo`: policy forward + backward over both completions (one row
[prompt | chosen | rejected] per pair, train/pairs.py), the reference forward, the loss and AdamW.
Median of `steps` timed steps after one warm-up step.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import dpo_tiny, models
from model import sharding
from model.transformer import ModelConfig, Transformer
from train import cpu_tuning, loop, objectives, optim, pairs

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


if __name__ == "__main__":
  cpu_tuning.apply()
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--completion_len", type=int, default=64)
  p.add_argument("--loss", default="sigmoid")
  p.add_argument("--steps", type=int, default=5)
  a = p.parse_args()
  print(json.dumps(bench_dpo(a.preset, a.batch, a.prompt_len, a.completion_len, a.loss, steps=a.steps)))
