"""Every stage in order, each starting from an earlier one's checkpoint, then the evaluation report.

  python -m train.pipeline --config configs/demo.py --workdir runs/demo

A stage whose checkpoint already reached its `steps` is skipped and an unfinished one resumes,
so rerunning after an interruption continues where it stopped. Stage configs are sections of
the pipeline config (`--config.sft.steps=200` overrides one); a value "@name" of `init_from`,
`rl.reward_model` or `rl.value_init_from` means the workdir of the earlier stage called name.
Online algorithms (rl/algorithms.py: grpo, rloo, gspo, ppo) run in the online loop (rl/loop.py), the others in
train/loop.py. Then every stage is evaluated (eval/suite.py) against `eval.reference` with
`eval.reward_model` as the judge, and runs/.../report.md, report.json and the plots are written (eval/report.py).

This is the one module that imports every layer (configs -> model -> train -> rl -> eval):
`python -m train` runs its single stage through `run_stage`.
"""
import copy
import os
import time

from absl import flags, logging
import jax
from ml_collections import config_flags

from eval import report, suite
from rl import loop as rl_loop
from rl.algorithms import ALGORITHMS as RL_ALGORITHMS
from configs.errors import UserError
from train import cli, cpu_tuning, files, loop, rundir
from train.validate import validate

STAGE_REFS = ("init_from", "rl.reward_model", "rl.value_init_from")  # keys that may say "@stage"


def finished_step(stage_dir: str) -> int:
  """Latest finalised checkpoint step in stage_dir that passes its checksums (-1: none); a stage
  whose last step is corrupt is unfinished: it reruns from the step before."""
  if not files.isdir(os.path.join(stage_dir, "checkpoints")):
    return -1
  step = rundir.latest_step(stage_dir)
  return -1 if step is None else step


def _get(cfg, dotted: str):
  for part in dotted.split("."):
    if part not in cfg:
      return None
    cfg = cfg[part]
  return cfg


def resolve(config, name: str, workdir: str):
  """A copy of stage `name`'s config with every "@stage" reference turned into that stage's dir
  (absolute: orbax restores only absolute paths)."""
  cfg = copy.deepcopy(config[name])
  earlier = list(config.stages)[:list(config.stages).index(name)]
  for key in STAGE_REFS:
    value = _get(cfg, key)
    if not isinstance(value, str) or not value.startswith("@"):
      continue
    if value[1:] not in earlier:
      raise UserError(f"config.{name}.{key}={value!r}: no earlier stage called {value[1:]!r} "
                      f"(stages before {name}: {earlier})")
    section, _, last = key.rpartition(".")
    (_get(cfg, section) if section else cfg)[last] = files.absolute(os.path.join(workdir, value[1:]))
  return cfg


def check(config, workdir: str) -> dict:
  """Every stage's resolved config, checked before anything runs; errors name the key."""
  stages = list(config.get("stages") or [])
  if not stages:
    raise UserError("config.stages is empty: list the stage sections to run, e.g. ['pretrain', 'sft']")
  for name in stages:
    if name not in config or not hasattr(config[name], "objective"):
      raise UserError(f"config.stages: {name!r} is not a stage section of the config")
  if len(set(stages)) != len(stages):
    raise UserError(f"config.stages={stages} names a stage twice")
  for key in ("reference", "reward_model"):
    if config.eval[key] and config.eval[key] not in stages:
      raise UserError(f"config.eval.{key}={config.eval[key]!r} is not one of config.stages {stages}")
  resolved = {name: resolve(config, name, workdir) for name in stages}
  for name, cfg in resolved.items():
    try:
      rl_loop.check_config(cfg) if cfg.objective in RL_ALGORITHMS else validate(cfg, jax.device_count(),
                                                                          jax.process_count())
    except UserError as e:
      raise UserError(f"stage {name}: {e}".replace("config.", f"config.{name}."), e.hint) from None
  return resolved


def run_stage(cfg, stage_dir: str) -> dict:
  """One stage in its loop: the online loop for the algorithms of rl/algorithms.py, the offline
  trainer for the rest; the stage's directory is locked while it runs (train/rundir.py `locked`)."""
  with rundir.locked(stage_dir):
    if cfg.objective in RL_ALGORITHMS:
      return rl_loop.train(cfg, stage_dir)
    return loop.train(cfg, stage_dir)


def run_stages(resolved: dict, workdir: str) -> dict:
  """Runs the unfinished stages in order; returns {stage: its workdir}."""
  dirs = {}
  for name, cfg in resolved.items():
    dirs[name] = os.path.join(workdir, name)
    done = finished_step(dirs[name])
    if done >= cfg.steps:
      print(f"== {name}: finished earlier (step {done}), skipped", flush=True)
      continue
    t0 = time.time()
    print(f"== {name}: {cfg.objective}" + (f" from {cfg.init_from}" if cfg.init_from else ""), flush=True)
    run_stage(cfg, dirs[name])
    if finished_step(dirs[name]) < cfg.steps:  # Ctrl-C / SIGTERM: the stage saved and returned
      raise SystemExit(f"== {name}: stopped at step {finished_step(dirs[name])} of {cfg.steps}; "
                       "rerun the same command to resume")
    print(f"== {name}: done in {(time.time() - t0) / 60:.1f} min", flush=True)
  return dirs


def evaluate(config, resolved: dict, dirs: dict) -> dict:
  """The suite's row of every stage, the reference first (its answers are reused for win rates).
  Held-out perplexity scores the conversations of the SFT stage's saved config (else each run's own)."""
  e = config.eval
  sft = next((name for name, c in resolved.items() if c.objective == "sft"), None)
  heldout = rundir.load_config(dirs[sft]) if sft else None
  ref = dirs[e.reference] if e.reference else ""
  rm = dirs[e.reward_model] if e.reward_model else ""
  order = sorted(resolved, key=lambda n: n != e.reference)
  rows, ref_answers = {}, None
  for name in order:
    print(f"== evaluating {name}", flush=True)
    rows[name] = suite.evaluate_run(dirs[name], e, heldout, reference=ref, reward_model=rm,
                                    reference_completions=ref_answers)
    if name == e.reference:
      ref_answers = rows[name].get("completions")
  return {name: rows[name] for name in resolved}


def run_pipeline(config, workdir: str) -> dict:
  """Checks, trains every unfinished stage, evaluates all of them, writes the report; the rows."""
  t0 = time.time()
  resolved = check(config, workdir)
  files.makedirs(workdir)
  with files.open(os.path.join(workdir, "pipeline.json"), "w") as f:
    f.write(config.to_json(indent=2))
  dirs = run_stages(resolved, workdir)
  rows = evaluate(config, resolved, dirs)
  md = report.write(workdir, rows, dirs, suite.COLUMNS)
  print(f"\n{md}\n\nreport: {os.path.join(workdir, 'report.md')} "
        f"({(time.time() - t0) / 60:.1f} min)", flush=True)
  return rows


def main(argv):
  cli.no_arguments(argv)
  logging.set_verbosity(logging.WARNING)
  cpu_tuning.apply()
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/kiln/jax")))
  run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Flags only when run as a program: `python -m train` imports this module and has its own.
  config_flags.DEFINE_config_file("config", None, "Pipeline config, e.g. configs/demo.py[:size].")
  flags.DEFINE_string("workdir", None, "Pipeline directory: one subdirectory per stage.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
