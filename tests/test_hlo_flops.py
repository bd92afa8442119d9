"""train/hlo_flops.py: the FLOPs a program compiled for a TPU slice runs, against NumPy's count of
the same matmuls, and the splash kernels' against the tiles of a NumPy causal mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from model import splash
from train import hlo_flops, hlo_stats, topology

pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")


def _one_chip():
  return jax.sharding.Mesh(np.array(topology.devices("v5p-8")[:1]), ("x",))


def _compiled_text(f, *shapes):
  mesh = _one_chip()
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, P())) for s in shapes]
  return jax.jit(f).lower(*args).compile().as_text()


def _einsum_flops(spec: str, *shapes) -> float:
  """2 x the product of every index's size (each output element sums over the contracted ones)."""
  sizes = {}
  for labels, shape in zip(spec.split("->")[0].split(","), shapes):
    sizes.update(zip(labels, shape))
  return 2 * np.prod(np.array(list(sizes.values()), dtype=np.float64))


@pytest.mark.parametrize("spec", ["mk,kn->mn", "btd,dkgh->btkgh", "bkgts,bskh->btkgh", "btv,btd->dv"])
def test_the_matmuls_of_a_compiled_einsum_are_numpys(spec):
  rng = np.random.default_rng(sum(map(ord, spec)))
  size = {c: int(rng.choice([2, 3, 4, 8])) if c in "kgb" else int(rng.integers(1, 5)) * 128 for c in set(spec)}
  shapes = [tuple(size[c] for c in labels) for labels in spec.split("->")[0].split(",")]
  text = _compiled_text(lambda a, b: jnp.einsum(spec, a, b), *shapes)
  assert hlo_flops.flops(text)["matmul"] == _einsum_flops(spec, *shapes)


def test_a_scanned_matmul_counts_once_per_layer_and_its_gradient_twice_more():
  """L scanned layers of h @ w and their gradient: 3 matmuls of [m, k] x [k, k] per layer."""
  layers, m, k = 5, 256, 384

  def loss(ws, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0].astype(jnp.float32).sum()

  text = _compiled_text(jax.grad(loss), (layers, k, k), (m, k))
  assert hlo_flops.flops(text)["matmul"] == 3 * layers * _einsum_flops("mk,kn->mn", (m, k), (k, k))


def test_convolution_positions_that_meet_the_input():
  """XLA:TPU's spelling of a dot's free dimension: a window of k over a 1-wide input padded k - 1
  on each side meets the input once per output; a plain 3-wide window without padding 3 times."""
  assert hlo_flops._valid_positions(1, 4, 4, 3, 1, 1, 1) == 4
  assert hlo_flops._valid_positions(10, 8, 3, 0, 1, 1, 1) == 24
  rest = "window={size=1x2x4 pad=0_0x1_1x3_3 rhs_reversal=0x1x1}, dim_labels=0bf12_12oi0->0b12f, metadata={}"
  assert hlo_flops.conv_flops([4, 256, 2, 4, 16], [4, 256, 64, 1, 1], rest) == 2 * 4 * 256 * 64 * 2 * 4 * 16


@pytest.mark.parametrize("t,hd", [(384, 64), (2048, 128)])
def test_splash_kernel_flops_count_the_tiles_a_causal_mask_touches(t, hd):
  block = splash.block_sizes(t).block_q
  n = t // block
  causal = np.tril(np.ones((t, t), dtype=bool))
  tiles = causal.reshape(n, block, n, block).any(axis=(1, 3)).sum()   # tiles with any visible key
  rows, heads, kv = 3, 8, 2
  q, k = [rows, heads, t, hd], [rows, kv, t, hd]
  for phase, matmuls in (("fwd", 2), ("dq", 3), ("dkv", 4)):
    name = f"splash_mha_{phase}_segmented_no_residuals"
    got = splash.flops(name, [[1, 1, 1], [1, 1, 1], q, k, k])
    assert got == matmuls * 2.0 * rows * heads * tiles * block * block * hd, phase
  assert splash.flops("flash_attention", [[1], [1], q, k]) is None


PEELED = """
%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (q: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %q = (s32[], f32[8,16]) parameter(0)
  %i.1 = s32[] get-tuple-element(%q), index=0
  %x = f32[8,16] get-tuple-element(%q), index=1
  %w = f32[16,16] all-gather(%x), replica_groups={{0,1}}, dimensions={0}
  %y = f32[8,16] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i.1, %one)
  ROOT %t = (s32[], f32[8,16]) tuple(%next, %y)
}

ENTRY %main (a: f32[8,16]) -> (s32[], f32[8,16]) {
  %a = f32[8,16] parameter(0)
  %first = s32[] constant(START)
  %counter = s32[] copy(%first)
  %init = (s32[], f32[8,16]) tuple(%counter, %a)
  ROOT %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
}
"""


@pytest.mark.parametrize("start", [0, 1, 4])
def test_a_loop_counts_from_where_its_counter_starts(start):
  """XLA peels a scan's first iteration out of its loop, which then counts i from 1 to N: N - 1
  runs of its body, each an all-gather and an [8, 16] x [16, 16] dot."""
  text = PEELED.replace("START", str(start))
  assert hlo_stats.stats(text, 2)["collectives"]["all-gather"]["count"] == 6 - start
  assert hlo_flops.flops(text)["matmul"] == (6 - start) * 2 * 8 * 16 * 16
