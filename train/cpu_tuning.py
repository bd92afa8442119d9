"""Process settings that make XLA:CPU faster, applied by every entry point first thing (`apply`).

Importing Kiln's packages changes nothing process-wide; `python -m train`, `python -m
train.pipeline`, the eval/ commands, eval/bench.py's child processes and tests/conftest.py call
`apply()` before any JAX computation.

1. XLA:CPU runs matmuls through YNNPACK by default; its Eigen path is faster on the CPUs we
   measured (small train step +10-24%, medium +5%, decode +20%: interleaved runs on 2 AMD EPYC
   cores; see eval/bench.py). The flag is read when JAX starts its backends, and only by the CPU
   compiler, so it is set on every backend (inert on GPU/TPU); an XLA_FLAGS that already names it
   wins. KILN_YNNPACK=1 keeps XLA's default.
2. Freed memory is kept and reused, on the CPU backend only: XLA:CPU allocates each call's
   temporaries as one block (~300 MB for a `small` train step, several GB for bigger models) and
   frees it when the call returns. glibc serves a block that big with a fresh mmap and gives it
   back with munmap, so every step the kernel maps and zero-fills each of its pages again: 77k
   page faults and ~0.25 s of system time per `small` train step on a 2-core box. With no mmap'd
   chunks and no trimming the block comes from the main heap and the next call reuses it, already
   mapped. That needs the block malloc'd on the main thread (another thread's arena would still
   mmap it), so single-device CPU computations run inline on the calling thread
   (`jax_cpu_enable_async_dispatch` False; forcing every thread onto the main arena instead made
   decoding 13% slower through lock contention). The cost: freed memory stays with the process
   (its peak RSS is what it keeps) instead of returning to the OS. KILN_MALLOC=system keeps
   glibc's and JAX's defaults.
3. A host without a TPU never starts libtpu: installed (by the `tpu` or `test` extras, for
   `python -m train.aot`), JAX would try it first on every start and print pages of warnings about
   TPU workers it cannot find. `skip_absent_tpu` leaves it out of jax_platforms unless the host has
   a TPU device file; JAX_PLATFORMS set by the user wins.
"""
import ctypes
import ctypes.util
import glob
import importlib.util
import os

import jax

EIGEN_MATMULS = "--xla_cpu_experimental_ynn_fusion_type="

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def xla_flags(flags: str, environ=os.environ) -> str:
  """XLA_FLAGS with the Eigen matmul path added, unless `flags` names the YNNPACK setting already
  or KILN_YNNPACK=1."""
  if environ.get("KILN_YNNPACK") == "1" or "ynn_fusion_type" in flags:
    return flags
  return (flags + " " + EIGEN_MATMULS).strip()


def glibc():
  """The C library as a ctypes handle if it is glibc, else None (macOS, musl)."""
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # glibc only
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """No mmap'd chunks, no trimming of the heap. True if glibc took the settings; a no-op
  returning False where the C library is not glibc."""
  libc = glibc()
  if libc is None:
    return False
  settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def skip_absent_tpu() -> None:
  """jax_platforms without tpu where libtpu is installed but no TPU is attached. Must run before
  JAX starts its backends (`jax.distributed.initialize` starts them)."""
  if jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU VMs: v4/v5e, v5p/v6e
    return
  jax.config.update("jax_platforms", "cuda,cpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu")


def apply() -> str:
  """Applies the settings above; returns the default backend ("cpu", "gpu", "tpu").

  Call it first thing: after `jax.distributed.initialize` where that runs (this starts JAX's
  backends), before anything else does. Async dispatch is read when JAX creates its CPU client, so
  it is turned off before the backend is known; it only concerns computations placed on that
  client, which on a GPU/TPU host are not the model's. Calling it again changes nothing."""
  skip_absent_tpu()
  os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
  reuse_memory = os.environ.get("KILN_MALLOC") != "system" and glibc() is not None
  if reuse_memory:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  backend = jax.default_backend()
  if reuse_memory and backend == "cpu":
    keep_freed_memory()
  return backend
