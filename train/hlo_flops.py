"""The FLOPs a compiled program runs per chip, read from its optimized HLO: what the chip computes,
rematerialized passes included, as against the model's formula (model/transformer.py
`train_flops_per_token`), which MFU counts.

XLA's `cost_analysis()` counts a while loop's body once (a scanned 32-layer model looks like a
1-layer one) and a Pallas kernel (a custom call) as nothing. Here every dot and convolution, in
fusions too, counts as often as its computation runs (train/hlo_stats.py `multiplicities`), and
each custom call the caller's `kernel_flops(name, operand shapes)` knows (the splash attention
kernels, model/splash.py `flops`) adds its own.

A dot is 2 x result elements x contracted size. XLA:TPU writes most matmuls as convolutions,
some with a dot's free dimensions as spatial ones whose window slides over padding (a window of k
over a 1-wide input padded k - 1 on each side: k outputs, each meeting one input): as XLA's own
cost analysis, a convolution is 2 x input features / feature groups x output features x batch /
batch groups x, per spatial dimension, the (output, window) positions that meet the input.
"""
import math
import re

from train import hlo_stats

_WINDOW = re.compile(r"window=\{([^}]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=([\w]+)_([\w]+)->([\w]+)")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_GROUPS = re.compile(r"(feature|batch)_group_count=(\d+)")
_OPERAND_SHAPES = re.compile(r"operand_layout_constraints=\{(.*?)\}(?:, \w+=|$)")


def dims(shape: str) -> list:
  """The dimensions of the (first) array in a shape string: "bf16[4,256]{1,0}" -> [4, 256]."""
  found = hlo_stats._ARRAY.search(shape)
  return [int(x) for x in found.group(2).split(",") if x] if found else []


def dot_flops(result: list, lhs: list, rest: str) -> float:
  """2 x result elements x the product of the lhs's contracting dimensions."""
  m = _CONTRACTING.search(rest)
  contracted = [int(i) for i in m.group(1).split(",") if i] if m else []
  return 2.0 * math.prod(result) * math.prod(lhs[i] for i in contracted)


def _window(rest: str, n_spatial: int) -> dict:
  """{field: [value per spatial dim]} of a convolution's window (size, pad as (lo, hi), stride,
  lhs_dilate, rhs_dilate), with XLA's defaults for the fields it leaves out."""
  out = {"size": [1] * n_spatial, "pad": [(0, 0)] * n_spatial, "stride": [1] * n_spatial,
         "lhs_dilate": [1] * n_spatial, "rhs_dilate": [1] * n_spatial}
  m = _WINDOW.search(rest)
  for field in (m.group(1).split() if m else []):
    key, _, value = field.partition("=")
    parts = value.split("x")
    if key == "pad":
      out["pad"] = [tuple(int(v) for v in p.split("_")) for p in parts]
    elif key in out:
      out[key] = [int(v) for v in parts]
  return out


def _valid_positions(in_size: int, out_size: int, size: int, pad_lo: int, stride: int, lhs_dilate: int,
                     rhs_dilate: int) -> int:
  """(output, window) position pairs of one spatial dimension that land on an input element."""
  count = 0
  for o in range(out_size):
    for k in range(size):
      at = o * stride - pad_lo + k * rhs_dilate
      count += at % lhs_dilate == 0 and 0 <= at // lhs_dilate < in_size
  return count


def conv_flops(result: list, lhs: list, rest: str) -> float:
  """FLOPs of a convolution (the module docstring), from its result and lhs dimensions and its
  attributes (window, dim_labels, group counts)."""
  m = _DIM_LABELS.search(rest)
  if not m:
    return 0.0
  lhs_labels, _, out_labels = m.groups()
  spatial = sorted(c for c in lhs_labels if c.isdigit())
  win = _window(rest, len(spatial))
  groups = dict(_GROUPS.findall(rest))
  features, batch = lhs[lhs_labels.index("f")], lhs[lhs_labels.index("b")]
  fma = (features / int(groups.get("feature", 1))) * result[out_labels.index("f")] * batch / int(groups.get("batch", 1))
  for i, s in enumerate(spatial):
    fma *= _valid_positions(lhs[lhs_labels.index(s)], result[out_labels.index(s)], win["size"][i], win["pad"][i][0],
                            win["stride"][i], win["lhs_dilate"][i], win["rhs_dilate"][i])
  return 2.0 * fma


def operand_shapes(rest: str) -> list:
  """A custom call's operand shapes ([dims] each) from its operand_layout_constraints."""
  m = _OPERAND_SHAPES.search(rest)
  return [[int(x) for x in d.split(",") if x] for _, d in hlo_stats._ARRAY.findall(m.group(1))] if m else []


def flops(hlo: str, kernel_flops=None) -> dict:
  """{"matmul": FLOPs of the dots and convolutions, "kernels": of the custom calls kernel_flops
  knows, "unknown_kernels": names of the custom calls it does not} per chip per step of an
  optimized (SPMD-partitioned) HLO module's text. kernel_flops(name, [operand dims]) -> FLOPs or
  None; name is the instruction's without its ".N" suffix."""
  comps, entry = hlo_stats.parse(hlo)
  mult = hlo_stats.multiplicities(comps, entry)[0]
  matmul, kernels, unknown = 0.0, 0.0, set()
  for name, instrs in comps.items():
    times = mult.get(name, 0.0)
    if not times:
      continue
    shapes = {i.name: i.shape for i in instrs}
    for ins in instrs:
      if ins.opcode in ("dot", "convolution"):
        count = dot_flops if ins.opcode == "dot" else conv_flops
        matmul += times * count(dims(ins.shape), dims(shapes[ins.operands[0]]), ins.rest)
      elif ins.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in ins.rest:
        kernel = re.sub(r"\.\d+$", "", ins.name)
        f = kernel_flops(kernel, operand_shapes(ins.rest)) if kernel_flops else None
        if f is None:
          unknown.add(kernel)
        else:
          kernels += times * f
  return {"matmul": matmul, "kernels": kernels, "unknown_kernels": sorted(unknown)}
