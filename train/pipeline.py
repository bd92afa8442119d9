"""Every stage in order, each starting from the previous one's checkpoint, then the report.

  python -m train.pipeline --config configs/demo.py --workdir runs/demo

A stage whose checkpoint already reached its `steps` is skipped and an unfinished one resumes,
so rerunning after an interruption continues where it stopped. Stage configs are sections of
the pipeline config (`--config.sft.steps=200` overrides one); `init_from="@pretrain"` means
the workdir of the stage called pretrain.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config, e.g. configs/demo.py[:size].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline directory: one subdirectory per stage.")
flags.mark_flags_as_required(["config", "workdir"])


def finished_step(stage_dir: str) -> int:
  """Latest finalised checkpoint step in stage_dir (orbax renames a step dir only once complete)."""
  ckpt = os.path.join(stage_dir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
  return max(steps, default=-1)


def resolve(stage_cfg, workdir: str):
  if stage_cfg.init_from.startswith("@"):
    stage_cfg.init_from = os.path.join(workdir, stage_cfg.init_from[1:])
  return stage_cfg


def run_stage(name: str, cfg, stage_dir: str):
  from train import loop
  trainers = {}
  try:
    from rl import loop as rl_loop
    trainers = {"grpo": rl_loop.train, "ppo": rl_loop.train}
  except ImportError:
    pass
  return trainers.get(cfg.objective, loop.train)(cfg, stage_dir)


def run_pipeline(config, workdir: str) -> dict:
  from eval import report, suite
  os.makedirs(workdir, exist_ok=True)
  stage_dirs = {}
  for name in config.stages:
    cfg = resolve(config[name], workdir)
    stage_dir = os.path.join(workdir, name)
    stage_dirs[name] = stage_dir
    done = finished_step(stage_dir)
    if done >= cfg.steps:
      print(f"== {name}: finished earlier (step {done}), skipped", flush=True)
      continue
    print(f"== {name}: {cfg.objective}" + (f" from {cfg.init_from}" if cfg.init_from else ""), flush=True)
    run_stage(name, cfg, stage_dir)

  rows = {}
  for name in config.stages:
    if config[name].objective in config.eval.skip_objectives:
      continue
    print(f"== evaluating {name}", flush=True)
    rows[name] = suite.evaluate_run(stage_dirs[name], config.eval, config.sft)
  md = report.write(workdir, rows, stage_dirs, suite.COLUMNS)
  print("\n" + md + f"\n\nreport: {os.path.join(workdir, 'report.md')}", flush=True)
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/kiln/jax")))
  run_pipeline(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
