"""Named TPU slices as compile-only devices: `train.aot` compiles for them on any host.

Names follow Cloud TPU's: v4-N and v5p-N count TensorCores (two per chip, so v5p-256 is 128
chips, 4x4x8); v5e-N (also v5litepod-N) and v6e-N count chips. "v5p:4x4x8" names the chip grid
itself. The grids are the slice shapes the Cloud TPU docs list for each size.
"""
import os

from jax.experimental import topologies

from configs.errors import UserError

GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# generation -> (libtpu's name, cores counted per chip in the slice name, grids by chip count, megacore)
GENERATIONS = {"v4": ("v4", 2, GRIDS_3D, True), "v5p": ("v5p", 2, GRIDS_3D, True),
               "v5e": ("v5e", 1, GRIDS_2D, False), "v5litepod": ("v5e", 1, GRIDS_2D, False),
               "v6e": ("v6e", 1, GRIDS_2D, False)}
# libtpu reads these at start: off a TPU VM their absence prints pages of warnings, and without the
# first a second process (a parallel test worker) would stop at libtpu's lockfile.
QUIET_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
             "TPU_ACCELERATOR_TYPE": "v5p-8"}


def parse(name: str) -> tuple[str, str, bool]:
  """"v5p-256" -> ("v5p", "4x4x8", megacore); "v6e:4x4" -> ("v6e", "4x4", False)."""
  gen, sep, size = name.replace(":", "-", 1).partition("-")
  if not sep or gen not in GENERATIONS:
    raise UserError(f"--topology {name!r}: use v4-N, v5p-N, v5e-N, v6e-N or GEN:AxBxC "
                     f"(generations {sorted(GENERATIONS)})")
  lib, cores, grids, megacore = GENERATIONS[gen]
  if "x" in size:
    return lib, size, megacore
  if not size.isdigit() or int(size) % cores or int(size) // cores not in grids:
    sizes = ", ".join(f"{gen}-{c * cores}" for c in grids)
    raise UserError(f"--topology {name!r}: no such slice; known: {sizes}")
  return lib, grids[int(size) // cores], megacore


def devices(name: str) -> list:
  """The compile-only devices of a named slice (needs libtpu: pip install 'kiln[tpu]')."""
  lib, grid, megacore = parse(name)
  for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)
  dims = [int(d) for d in grid.split("x")]
  host = (min(dims[0], 2), min(dims[1], 2), 1)
  kwargs = {"chip_config_name": "megacore"} if megacore else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{lib}:{grid}",
                                        chips_per_host_bounds=host, num_slices=1, **kwargs)
  except Exception as e:
    raise UserError(f"cannot build the {name} topology ({e})",
                    hint="compiling for TPU needs libtpu: pip install -e '.[tpu]'") from e
  return list(desc.devices)
