"""Pair accuracy of a reward model (or the implicit reward of a DPO policy) on preference pairs.

  python -m eval.preference --workdir runs/reward_tiny [--config.data=pairs.jsonl] [--config.step=N]

Reads DIR/config.json and DIR's latest (or config.step) checkpoint, then scores every pair of config.data (a
JSONL file of pairs or rankings, see train/pairs.py; no hold-out) or, without it, the run's own
held-out pairs. reward_model: r(x, chosen) > r(x, rejected) with the reward head; dpo: the implicit
reward beta * (log pi - log pi_ref), the reference being the run's init_from. Prints the pair
accuracy and the mean margin (r_w - r_l, or beta * Delta) with the other metrics of the objective.
"""
import functools

import jax

from configs import tools
from configs.errors import UserError

from model import sharding
from model.transformer import ModelConfig, Transformer
from train import cli, loop, objectives, pairs, run_tokenizer, rundir, sources
from train.params import abstract_params


def evaluate_pairs(workdir: str, data_path: str = "", step=None) -> dict:
  """{"pairs": n, "step": s, "accuracy": ..., "margin": ..., plus every eval/ metric}."""
  config = rundir.load_config(workdir)
  objective = objectives.get(config.objective)
  if objective.packed:
    raise UserError(f"{workdir} is a {config.objective!r} run: eval.preference needs reward_model or dpo")
  mesh = sharding.make_mesh(config.mesh)
  tok = run_tokenizer.load(workdir, config)
  model = Transformer(ModelConfig.from_config(config.model))
  with sharding.use_mesh(mesh):
    abs_p, p_sh, _, _ = abstract_params(model, config.seq_len, mesh, objective.extra_params)
    params, step = rundir.restore_params(workdir, abs_p, p_sh, step)
    ref = None
    if objective.needs_reference(config):
      abs_m, m_sh, _, _ = abstract_params(model, config.seq_len, mesh)
      ref, _ = rundir.restore_params(config.init_from, abs_m, m_sh)
    ps = (pairs.load_file(data_path, tok, config.seq_len, config.data.chat_template,
                          sources.overlong(config)) if data_path
          else pairs.load(config, tok, "eval"))
    batches = pairs.ordered_batches(ps, config.batch_size, jax.process_index(), jax.process_count())
    fn = jax.jit(lambda p, r, b: objective.loss(p, b, model, objectives.Context(config, r)))
    metrics = loop.evaluate(functools.partial(fn, params, ref), batches, mesh, perplexity=False)
  return {"pairs": len(ps), "step": step, "accuracy": metrics["eval/rewards/accuracy"],
          "margin": metrics["eval/rewards/margin"], **metrics}


def print_pair_accuracy(workdir: str, a) -> dict:
  """Prints (and returns) evaluate_pairs of configs/tools.py `preference()` options `a`."""
  out = evaluate_pairs(workdir, a.data, None if a.step < 0 else a.step)
  source = a.data or "the held-out pairs"
  print(f"{workdir} step {out['step']}: {out['pairs']} pairs from {source}: "
        f"pair accuracy {out['accuracy']:.4f}, mean margin {out['margin']:.4f}")
  print("  ".join(f"{k} {v:.4f}" for k, v in out.items() if k.startswith("eval/")))
  return out


def main():
  """`python -m eval.preference --workdir DIR [--config.KEY=VALUE ...]`."""
  cli.run_on_workdir(print_pair_accuracy, tools.preference(), "A reward_model or dpo run.")


if __name__ == "__main__":
  main()
