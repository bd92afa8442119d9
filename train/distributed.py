"""Multi-host start-up: `jax.distributed.initialize` when there is more than one process.

- TPU pods, SLURM and Open MPI launches are detected by JAX itself (run the same command on
  every host; no flags needed).
- Anything else: --coordinator HOST:PORT --num_processes N --process_id I (or the environment
  variables KILN_COORDINATOR, KILN_NUM_PROCESSES, KILN_PROCESS_ID).
"""
import os

import jax


def _cluster_detected() -> bool:
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", "")
          or "MEGASCALE_COORDINATOR_ADDRESS" in env)


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Initializes the JAX distributed runtime if asked or detected; returns whether it did."""
  coordinator = coordinator or os.environ.get("KILN_COORDINATOR", "")
  num_processes = num_processes or int(os.environ.get("KILN_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(os.environ.get("KILN_PROCESS_ID", "-1"))
  if coordinator:
    if num_processes <= 0 or process_id < 0:
      raise ValueError("--coordinator needs --num_processes and --process_id")
    # CPU processes need a collectives backend; this setting does not touch GPU/TPU clients.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
  if _cluster_detected():
    jax.distributed.initialize()
    return True
  return False
