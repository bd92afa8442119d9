"""RL step time (rollout + update) with random weights, on the shapes of the TRL reference runs.

  python -m eval.bench_rl [--which grpo|ppo|both] [--preset small] [--steps 5]

GRPO: 2 prompts x 8 generations, prompt 32, 64 new tokens, beta 0.04 with a reference model
(TRL ~1.6-1.7 s/step on 2 CPU cores). PPO: 8 prompts, prompt 32, 64 new tokens, 4 epochs, a
reference, a reward model and a separate critic (TRL ~2.6-2.8 s/step). A step is exactly what one
iteration of rl/loop.py runs on the device: sample (model/decode.py with the shared-prompt
prefill), score (reference log-probs, values, reward-model scores), advantages, update steps.
Stop tokens are off so every completion has all 64 tokens. Median (and min) of `steps` timed steps
after one warm-up (compile) step. On a shared machine, quote the min only next to the median.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import grpo_arith, models, ppo_arith
from model import heads, sharding
from model.transformer import ModelConfig, Transformer
from rl import algorithms, rollout, steps, value
from train import cpu_tuning, optim

TRL_SECONDS = {"grpo": 1.68, "ppo": 2.69}  # TRL s/step, docs/performance.md (midpoints)


def _config(which, preset, prompts, g, new_tokens, epochs, value_model):
  c = (grpo_arith if which == "grpo" else ppo_arith).get_config()
  c.model = models.get(preset)
  c.batch_size, c.rl.num_generations = prompts * g, g
  c.rl.max_new_tokens, c.rl.num_iterations, c.rl.num_minibatches = new_tokens, epochs, 1
  c.rl.beta = 0.04 if which == "grpo" else 0.05
  c.rl.value_model = value_model
  c.optim.lr = 1e-5
  return c


def _init(cfg, seed, extra=None):
  model = Transformer(cfg)
  def f(k):
    p = sharding.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])
    return {**p, **extra(cfg, jax.random.fold_in(k, 1))} if extra else p
  return jax.jit(f)(jax.random.key(seed))


def bench(which="grpo", preset="small", prompts=2, g=8, prompt_len=32, new_tokens=64, epochs=1,
          steps_timed=5, value_model="critic", seed=0) -> dict:
  """Seconds per RL step, split into generate / score / update, for objective `which`."""
  c = _config(which, preset, prompts, g, new_tokens, epochs, value_model)
  cfg = ModelConfig.from_config(c.model)
  ppo = which == "ppo"
  head = ppo and value_model == "policy"
  policy = _init(cfg, seed, value.value_head_params if head else None)
  ref = _init(cfg, seed)  # a separate copy, as with full fine-tuning
  critic = _init(cfg, seed + 1, value.value_head_params) if ppo and not head else None
  rm = _init(cfg, seed + 2, heads.reward_head_params) if ppo else None
  tx, lr_fn = optim.make_optimizer(c.optim, 1000)
  opt, critic_opt = tx.init(policy), (tx.init(critic) if critic is not None else None)
  score = jax.jit(steps.make_score_fn(cfg, c, None, old=ppo, ref=True, critic_cfg=cfg if critic else None,
                                      rm_cfg=cfg if ppo else None))
  update = jax.jit(steps.make_update_step(cfg, c, tx, lr_fn, None, cfg if critic else None),
                   donate_argnums=(0, 1, 2, 3))
  adv_fn = jax.jit(lambda s, b: algorithms.get(which).advantages(c, s, b, 0.05 if ppo else 0.04))
  rng = np.random.default_rng(seed)
  prompt = rng.integers(10, cfg.vocab_size, (prompts, prompt_len)).astype(np.int32)
  pmask = np.ones_like(prompt)
  times = []
  for i in range(steps_timed + 1):
    t0 = time.perf_counter()
    gen = rollout.sample(policy, cfg, prompt, pmask, jax.random.key(i), g, max_new_tokens=new_tokens,
                         temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0)
    tokens = np.asarray(gen.tokens)
    t1 = time.perf_counter()
    batch = {"prompt": jnp.asarray(prompt), "prompt_mask": jnp.asarray(pmask), "tokens": gen.tokens,
             "mask": gen.mask}
    batch.update(score(policy, None, ref, critic, rm, batch))
    scores = (tokens % 7 == 0).mean(-1).astype(np.float32)  # a cheap host-side reward
    if ppo:
      scores = scores + np.asarray(batch.pop("rm_score"))
    batch.update(adv_fn(jnp.asarray(scores), batch))
    jax.block_until_ready(batch)
    t2 = time.perf_counter()
    for e in range(epochs):
      policy, opt, critic, critic_opt, logp, m = update(policy, opt, critic, critic_opt, None, batch,
                                                        jnp.float32(0.04), jnp.int32(e))
      batch.setdefault("old_logp", logp)
    jax.block_until_ready((policy, m))
    t3 = time.perf_counter()
    times.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
  first, rest = times[0], times[1:]
  med = lambda j: statistics.median(t[j] for t in rest)
  step_s = med(0)
  return dict(which=which, preset=preset, prompts=prompts, generations=g, prompt_len=prompt_len,
              new_tokens=new_tokens, epochs=epochs, value_model=value_model if ppo else None,
              step_s=step_s, generate_s=med(1), score_s=med(2), update_s=med(3),
              step_min_s=min(t[0] for t in rest), first_step_s=first[0],
              trl_s=TRL_SECONDS[which], speedup_vs_trl=TRL_SECONDS[which] / step_s,
              loss=float(m["loss"]), backend=jax.default_backend())


def bench_grpo(**kw) -> dict:
  """2 prompts x 8 generations, prompt 32, 64 new tokens, beta 0.04 with a reference model."""
  return bench("grpo", **{**dict(prompts=2, g=8, epochs=1), **kw})


def bench_ppo(**kw) -> dict:
  """Batch 8, prompt 32, 64 new tokens, 4 epochs, reference + reward model + separate critic."""
  return bench("ppo", **{**dict(prompts=8, g=1, epochs=4), **kw})


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--which", default="both", choices=["grpo", "ppo", "both"])
  ap.add_argument("--preset", default="small")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--value_model", default="critic", choices=["critic", "policy"])
  a = ap.parse_args()
  if a.which in ("grpo", "both"):
    print(json.dumps(bench_grpo(preset=a.preset, steps_timed=a.steps)))
  if a.which in ("ppo", "both"):
    print(json.dumps(bench_ppo(preset=a.preset, steps_timed=a.steps, value_model=a.value_model)))


if __name__ == "__main__":
  cpu_tuning.apply()
  main()
