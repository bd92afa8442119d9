"""Kiln's model package. Importing it (every entry point does) sets two CPU process defaults.

1. XLA:CPU runs matmuls through YNNPACK by default; its Eigen path is faster on the CPUs we
   measured (small train step +10-24%, medium +5%, decode +20%: interleaved runs on 2 AMD EPYC
   cores; see eval/bench.py). The flag only matters for the CPU backend and only if set before
   JAX starts its backends; an XLA_FLAGS that already names it wins. KILN_YNNPACK=1 keeps XLA's
   default.
2. Freed memory is kept and reused (model/heap.py): XLA:CPU allocates each call's temporaries
   as one block (300 MB for a `small` train step) that glibc would mmap and unmap every call,
   so the kernel zero-filled all of it again on every step. glibc keeps freed memory, and
   single-device CPU computations run on the calling thread so that block comes from the main
   heap. KILN_MALLOC=system keeps glibc's and JAX's defaults.
"""
import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
if os.environ.get("KILN_YNNPACK") != "1" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (after XLA_FLAGS: nothing of XLA may read them earlier)

from model import heap  # noqa: E402

if os.environ.get("KILN_MALLOC") != "system" and heap.keep_freed_memory():
  jax.config.update("jax_cpu_enable_async_dispatch", False)
