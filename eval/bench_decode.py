"""Decode throughput: generated tokens/s of `model.decode.generate`, random weights.

  python -m eval.bench_decode [--preset small --batch 8 --prompt_len 32 --new_tokens 128 --top_p 0.9]
  KILN_YNNPACK=1 python -m eval.bench_decode   # XLA:CPU default dots (YNNPACK) instead of Eigen

EOS is disabled, so every row generates all `new_tokens`. One warm-up call (it compiles), then
the median of `repeats` timed calls. Reference on the 2-core CPU box (docs/performance.md): Hugging
Face generate does 661-785 tok/s on the same shapes with top-p 0.9. `bench_decode` itself applies
no process settings: the command line applies train/cpu_tuning.py first, as eval/bench.py's
child processes do.
"""
import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import models
from model import decode
from model.transformer import ModelConfig, Transformer
from train import cpu_tuning

HF_GENERATE_TOK_S = 723.0  # middle of the 661-785 tok/s measured for HF generate (small, top-p 0.9)


def bench_decode(preset: str = "small", batch: int = 8, prompt_len: int = 32, new_tokens: int = 128,
                 top_p: float = 0.9, temperature: float = 1.0, top_k: int = 0, repeats: int = 3,
                 phases: int = decode.PHASES, seed: int = 0, **model_overrides) -> dict:
  """{tokens_per_sec, ms_per_step, ...} of sampling new_tokens for batch prompts of prompt_len."""
  model_cfg = models.get(preset)
  model_cfg.update(model_overrides)
  cfg = ModelConfig.from_config(model_cfg)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = jax.jit(lambda k: nn.meta.unbox(Transformer(cfg).init(k, dummy))["params"])(jax.random.key(seed))
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, prompt_len), 0, cfg.vocab_size)

  def run(i):
    out = decode.generate(params, cfg, tokens, key=jax.random.key(i), max_new_tokens=new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=(), phases=phases)
    return jax.block_until_ready(out)

  t0 = time.perf_counter()
  out = run(0)
  first = time.perf_counter() - t0
  assert int(out.lengths.min()) == new_tokens, out.lengths
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    run(i + 1)
    times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  tok_s = batch * new_tokens / sec
  return dict(preset=preset, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
              temperature=temperature, top_k=top_k, top_p=top_p, phases=phases,
              tokens_per_sec=round(tok_s, 1), vs_hf_generate=round(tok_s / HF_GENERATE_TOK_S, 2),
              ms_per_step=round(1e3 * sec / new_tokens, 3), seconds=[round(t, 4) for t in times],
              first_call_s=round(first, 2), backend=jax.default_backend())


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="small")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--top_p", type=float, default=0.9)
  ap.add_argument("--top_k", type=int, default=0)
  ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--phases", type=int, default=decode.PHASES)
  a = ap.parse_args()
  print(json.dumps(bench_decode(a.preset, a.batch, a.prompt_len, a.new_tokens, a.top_p, a.temperature,
                                a.top_k, a.repeats, a.phases)))


if __name__ == "__main__":
  cpu_tuning.apply()
  main()
