"""Published per-chip figures of the accelerators the project plans for: MFU and `train.aot`'s
roofline read them from here, and nowhere else.

Figures are the vendors' public datasheets: dense bf16 peak FLOP/s (no sparsity), HBM capacity
and bandwidth, and the inter-chip bandwidth one chip has in all (ICI links on TPU, NVLink on
NVIDIA GPUs), in bytes per second.
"""
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float      # dense bf16 FLOP/s
  hbm_bytes: float       # HBM capacity
  hbm_bandwidth: float   # bytes/s
  ici_bandwidth: float   # bytes/s, all of a chip's inter-chip links together


GiB = 2 ** 30
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1.2e12, 2400e9 / 8),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, 1600e9 / 8),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, 4800e9 / 8),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9, 3584e9 / 8),
    "a100": Chip("NVIDIA A100 80GB", 312e12, 80 * GiB, 2039e9, 600e9),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80 * GiB, 3350e9, 900e9),
    "h200": Chip("NVIDIA H200", 989e12, 141 * GiB, 4800e9, 900e9),
    "b200": Chip("NVIDIA B200", 2250e12, 180 * GiB, 8000e9, 1800e9),
}

# jax's device_kind -> chip. TPUs report exact kinds (v5p is "TPU v5", v5e "TPU v5 lite");
# NVIDIA kinds carry the memory and form factor ("NVIDIA H100 80GB HBM3"), so they are matched
# by the model name inside them.
TPU_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5": "v5p", "tpu v5p": "v5p",
             "tpu v6 lite": "v6e", "tpu v6e": "v6e"}
GPU_MODELS = ("a100", "h100", "h200", "b200")


def chip_of(device_kind: str) -> Optional[Chip]:
  """The chip a jax device_kind names, or None (CPUs, unknown accelerators)."""
  kind = device_kind.lower().strip()
  if kind in TPU_KINDS:
    return CHIPS[TPU_KINDS[kind]]
  for model in GPU_MODELS:
    if model in kind:
      return CHIPS[model]
  return None
