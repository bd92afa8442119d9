"""Reuse of freed host memory under glibc, so XLA:CPU's per-call buffers stop page-faulting.

XLA:CPU allocates the temporaries of every executable call as one block (~300 MB for a `small`
train step, several GB for bigger models) and frees it when the call returns. glibc serves a
block that big with a fresh mmap and gives it back with munmap, so every step the kernel maps
and zero-fills each of its pages again: 77k page faults and ~0.25 s of system time per `small`
train step on a 2-core box. With no mmap'd chunks and no trimming the block comes from the
main heap and the next call reuses it, already mapped. That needs the block malloc'd on the
main thread (another thread's arena would still mmap it), so model/__init__.py also runs
single-device CPU computations inline on the calling thread (`jax_cpu_enable_async_dispatch`
False; forcing every thread onto the main arena instead made decoding 13% slower through lock
contention). The cost: freed memory stays with the process (its peak RSS is what it keeps)
instead of returning to the OS.
"""
import ctypes
import ctypes.util

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """No mmap'd chunks, no trimming of the heap. True if glibc took the settings; a no-op
  returning False where the C library is not glibc (macOS, musl)."""
  name = ctypes.util.find_library("c")
  if not name:
    return False
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # glibc only
  except (OSError, AttributeError):
    return False
  settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
