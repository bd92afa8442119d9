"""Training throughput: tokens/s, TFLOP/s and MFU of one jitted AdamW step on random rows.

  python -m eval.bench_train --preset small --seq_len 256 --batch 8
"""
import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import base, models
from model.transformer import ModelConfig, Transformer
from train import cpu_tuning, loop, objectives, optim


def bench_train(preset="small", seq_len=256, batch=8, steps=10, **model_overrides) -> dict:
  model_cfg = models.get(preset)
  model_cfg.update(model_overrides)
  cfg = ModelConfig.from_config(model_cfg)
  model = Transformer(cfg)
  c = base.base_config()
  tx, lr = optim.make_optimizer(c.optim, 1000)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  data = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              segment_ids=np.ones((batch, seq_len), np.int32),
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
              loss_mask=np.ones((batch, seq_len), np.float32))
  data = jax.tree.map(jnp.asarray, data)
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, data["inputs"][:1]))["params"])(jax.random.key(0))
  opt_state = tx.init(params)
  step = jax.jit(loop.make_train_step(model, objectives.get("pretrain"), tx, lr, 1), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, data, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - t0
  params, opt_state, m = compiled(params, opt_state, data, jnp.int32(0))
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    params, opt_state, m = compiled(params, opt_state, data, jnp.int32(i))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  dt = float(np.median(times))
  tps = batch * seq_len / dt
  flops = cfg.train_flops_per_token(seq_len) * tps
  peak = loop.peak_flops(c)  # on a CPU: the matmul rate measured in this process
  return dict(preset=preset, seq_len=seq_len, batch=batch, step_s=dt, tokens_per_sec=tps,
              tflops=flops / 1e12, mfu=flops / peak, peak_tflops=peak / 1e12, compile_s=compile_s,
              loss=float(m["train/loss"]), backend=jax.default_backend())


if __name__ == "__main__":
  cpu_tuning.apply()
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="small")
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10)
  a = p.parse_args()
  print(bench_train(a.preset, a.seq_len, a.batch, a.steps))
