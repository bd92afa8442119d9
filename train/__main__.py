"""Entry point of every stage:

  python -m train --config configs/pretrain_tiny.py[:arg] --workdir DIR [--config.KEY=VALUE ...]

Rerunning the same command resumes from the latest checkpoint in DIR. The stage runs in its loop
(train/loop.py, or rl/loop.py for grpo / ppo) through train/pipeline.py `run_stage`. An error the
user can fix prints one line and a hint and exits 2 (train/cli.py `run`; `--debug`: the traceback).
"""
import os

from absl import flags, logging
from ml_collections import config_flags

from train import cli, cpu_tuning, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain_tiny.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-host without SLURM/TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.no_arguments(argv)
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  cpu_tuning.skip_absent_tpu()  # before distributed.initialize starts the backends
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cpu_tuning.apply()
  import jax
  # Reruns and resumes skip compilation: compiled programs are cached on disk.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/kiln/jax")))
  # After distributed init: importing the trainers (JAX backends) must come second.
  from train import pipeline
  metrics = pipeline.run_stage(_CONFIG.value, _WORKDIR.value)
  printable = {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval/")}
  print(f"finished at step {metrics.get('step')}: {printable}")


if __name__ == "__main__":
  cli.run(main)
