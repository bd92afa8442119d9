"""Pair accuracy of a reward model (or the implicit reward of a DPO policy) on preference pairs.

  python -m eval.preference --workdir runs/reward_tiny [--data pairs.jsonl] [--step N]

Reads DIR/config.json and DIR's latest (or --step) checkpoint, then scores every pair of --data (a
JSONL file of pairs or rankings, see train/pairs.py; no hold-out) or, without it, the run's own
held-out pairs. reward_model: r(x, chosen) > r(x, rejected) with the reward head; dpo: the implicit
reward beta * (log pi - log pi_ref), the reference being the run's init_from. Prints the pair
accuracy and the mean margin (r_w - r_l, or beta * Delta) with the other metrics of the objective.
"""
import argparse
import functools
import json
import os

import jax
import ml_collections

from model import sharding
from model.transformer import ModelConfig, Transformer
from train import checkpoint, cpu_tuning, data, loop, objectives, pairs
from train import state as state_lib


def evaluate_pairs(workdir: str, data_path: str = "", step=None) -> dict:
  """{"pairs": n, "step": s, "accuracy": ..., "margin": ..., plus every eval/ metric}."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  objective = objectives.get(config.objective)
  if objective.packed:
    raise ValueError(f"{workdir} is a {config.objective!r} run: eval.preference needs reward_model or dpo")
  mesh = sharding.make_mesh(config.mesh)
  tok = data.load_or_train_tokenizer(config)
  model = Transformer(ModelConfig.from_config(config.model))
  with sharding.use_mesh(mesh):
    abs_p, p_sh, _, _ = state_lib.abstract_params(model, config.seq_len, mesh, objective.extra_params)
    params, step = checkpoint.restore_params(workdir, abs_p, p_sh, step)
    ref = None
    if objective.needs_reference(config):
      abs_m, m_sh, _, _ = state_lib.abstract_params(model, config.seq_len, mesh)
      ref, _ = checkpoint.restore_params(config.init_from, abs_m, m_sh)
    ps = (pairs.load_file(data_path, tok, config.seq_len, config.data.chat_template) if data_path
          else pairs.load(config, tok, "eval"))
    batches = pairs.ordered_batches(ps, config.batch_size, jax.process_index(), jax.process_count())
    fn = jax.jit(lambda p, r, b: objective.loss(p, b, model, objectives.Context(config, r)))
    metrics = loop.evaluate(functools.partial(fn, params, ref), batches, mesh, perplexity=False)
  return {"pairs": len(ps), "step": step, "accuracy": metrics["eval/rewards/accuracy"],
          "margin": metrics["eval/rewards/margin"], **metrics}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a reward_model or dpo run")
  p.add_argument("--data", default="", help="JSONL pairs / rankings; default: the run's held-out pairs")
  p.add_argument("--step", type=int, default=None, help="checkpoint step; default: the latest")
  a = p.parse_args(argv)
  out = evaluate_pairs(a.workdir, a.data, a.step)
  source = a.data or "the held-out pairs"
  print(f"{a.workdir} step {out['step']}: {out['pairs']} pairs from {source}: "
        f"pair accuracy {out['accuracy']:.4f}, mean margin {out['margin']:.4f}")
  print("  ".join(f"{k} {v:.4f}" for k, v in out.items() if k.startswith("eval/")))
  return out


if __name__ == "__main__":
  cpu_tuning.apply()
  main()
