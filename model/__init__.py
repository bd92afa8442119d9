"""Kiln's model package. Importing it (every entry point does) sets one XLA:CPU default.

XLA:CPU runs matmuls through YNNPACK by default; its Eigen path is faster on the CPUs we measured
(small train step +10-24%, medium +5%, decode +20%: interleaved runs on 2 AMD EPYC cores; see
eval/bench.py). The flag only matters for the CPU backend and only if set before JAX starts its
backends; an XLA_FLAGS that already names it wins. KILN_YNNPACK=1 keeps XLA's default.
"""
import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
if os.environ.get("KILN_YNNPACK") != "1" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
