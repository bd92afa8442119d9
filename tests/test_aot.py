"""train.aot: the train step compiled for a TPU slice on this CPU host (libtpu, from the test
extra), and what is read off the compiled program."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import grpo_arith, ppo_arith, pretrain_tiny
from model.transformer import ModelConfig
from configs.errors import UserError
from model import sharding
from train import aot, chips, compiler_options, hlo_stats, objectives, pairs, topology

# The tests' persistent compilation cache (tests/conftest.py) stores TPU programs it cannot load back
# without a TPU: it says so, and compiles again.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")


def test_slice_names_follow_cloud_tpu():
  assert topology.parse("v5p-256") == ("v5p", "4x4x8", True)  # 256 TensorCores = 128 chips
  assert topology.parse("v4-8") == ("v4", "2x2x1", True)
  assert topology.parse("v5e-16") == ("v5e", "4x4", False)
  assert topology.parse("v5litepod-8") == ("v5e", "2x4", False)
  assert topology.parse("v6e-256") == ("v6e", "16x16", False)
  assert topology.parse("v5p:4x4x8") == ("v5p", "4x4x8", True)
  with pytest.raises(ValueError, match="no such slice; known: v5p-8, v5p-16"):
    topology.parse("v5p-12")
  with pytest.raises(ValueError, match="use v4-N, v5p-N"):
    topology.parse("tpu7-8")


def test_device_kinds_name_their_chips():
  kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e",
           "NVIDIA A100-SXM4-80GB": "a100", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200",
           "NVIDIA B200": "b200"}
  for kind, name in kinds.items():
    assert chips.chip_of(kind) is chips.CHIPS[name], kind
  assert chips.chip_of("cpu") is None
  assert chips.chip_of("TPU v5").peak_flops == 459e12 and chips.chip_of("TPU v5 lite").peak_flops == 197e12
  devices = topology.devices("v5p-8")
  assert len(devices) == 4 and chips.chip_of(devices[0].device_kind) is chips.CHIPS["v5p"]


def test_a_scanned_loop_counts_its_collectives_once_per_iteration():
  """Forward of L scanned layers whose weights are split over 4 chips: each layer gathers its
  [512, 512] bf16 weight once, so L all-gathers of 512 KiB per step, though the HLO holds one."""
  layers = 6
  mesh = jax.sharding.Mesh(np.array(topology.devices("v5p-8")), ("x",))

  def forward(ws, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0].sum()

  ws = jax.ShapeDtypeStruct((layers, 512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x")))
  x = jax.ShapeDtypeStruct((64, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
  hlo = jax.jit(forward).lower(ws, x).compile().as_text()
  assert hlo.count("all-gather(") + hlo.count("all-gather-start(") == 1
  gathers = hlo_stats.stats(hlo, 4)["collectives"]["all-gather"]
  assert gathers["count"] == layers
  assert gathers["bytes"] == layers * 512 * 512 * 2


def test_the_ici_bytes_of_each_collective_follow_its_group():
  """On 4 chips as 2 groups of 2 and as 1 group of 4, each chip holding [256, 128] f32: an
  all-gather to [256 g, 128], its all-reduce, and its reduce-scatter back to [256, 128]. A chip
  sends (g - 1)/g of an all-gather's result, g - 1 times a reduce-scatter's, 2 (g - 1)/g of an
  all-reduce's."""
  mesh = jax.sharding.Mesh(np.array(topology.devices("v5p-8")).reshape(2, 2), ("a", "b"))
  x = jax.ShapeDtypeStruct((1024, 128), jnp.float32, sharding=NamedSharding(mesh, P(("a", "b"))))
  for axes, g in ((("b",), 2), (("a", "b"), 4)):
    def f(x):
      full = jax.lax.all_gather(x, axes, tiled=True)  # [256 g, 128]
      return full, jax.lax.psum(full, axes), jax.lax.psum_scatter(full, axes, tiled=True)
    spec = P(("a", "b"))
    step = jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=(spec, spec, spec), check_vma=False)
    out = hlo_stats.stats(jax.jit(step).lower(x).compile().as_text(), 4)["collectives"]
    result = 256 * g * 128 * 4  # bytes of the gathered [256 g, 128] f32
    expect = {"all-gather": result * (g - 1) / g, "all-reduce": 2 * result * (g - 1) / g,
              "reduce-scatter": (result / g) * (g - 1)}
    for kind, sent in expect.items():
      assert out[kind]["count"] == 1 and out[kind]["ici_bytes"] == pytest.approx(sent), (kind, g)


EXPOSED_HLO = """
%matmul (p0: bf16[64,64], p1: bf16[64,64]) -> bf16[64,64] {
  %p0 = bf16[64,64]{1,0} parameter(0)
  %p1 = bf16[64,64]{1,0} parameter(1)
  ROOT %d = bf16[64,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%scatter (q: bf16[256,64]) -> bf16[64,64] {
  %q = bf16[256,64]{1,0} parameter(0)
  ROOT %rs = bf16[64,64]{1,0} reduce-scatter(%q), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}

ENTRY %main (a: bf16[64,64], b: bf16[256,64]) -> bf16[64,64] {
  %a = bf16[64,64]{1,0} parameter(0)
  %b = bf16[256,64]{1,0} parameter(1)
  %ag = (bf16[64,64]{1,0}, bf16[256,64]{1,0}) all-gather-start(%a), replica_groups={{0,1,2,3}}, dimensions={0}
  %f = bf16[64,64]{1,0} fusion(%a, %a), kind=kOutput, calls=%matmul
  %agd = bf16[256,64]{1,0} all-gather-done(%ag)
  %rs1 = ((bf16[256,64]{1,0}), bf16[64,64]{1,0}) call-start(%b), async_execution_thread="sparsecore", to_apply=%scatter
  %rs1d = bf16[64,64]{1,0} call-done(%rs1)
  %cp = (bf16[64,64]{1,0}, bf16[64,64]{1,0}) collective-permute-start(%f), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %e = bf16[64,64]{1,0} add(%f, %f)
  %cpd = bf16[64,64]{1,0} collective-permute-done(%cp)
  ROOT %out = bf16[64,64]{1,0} add(%cpd, %rs1d)
}
"""


def test_an_asynchronous_collective_with_no_compute_before_its_done_is_exposed():
  """Scheduled text, 4 chips: an all-gather overlapping a matmul fusion; an offloaded
  reduce-scatter (an async call) and a collective-permute overlapping an elementwise add only.
  All three are asynchronous; the last two have nothing to overlap."""
  comps, _ = hlo_stats.parse(EXPOSED_HLO)
  assert hlo_stats.exposed_starts(comps) == {"rs1", "cp"}
  col = hlo_stats.stats(EXPOSED_HLO, 4)["collectives"]
  gather, scatter, permute = col["all-gather"], col["reduce-scatter"], col["collective-permute"]
  assert gather["async_ici_bytes"] == gather["ici_bytes"] == 256 * 64 * 2 * 3 / 4 and gather["exposed_ici_bytes"] == 0
  assert scatter["exposed_ici_bytes"] == scatter["async_ici_bytes"] == scatter["ici_bytes"] == 64 * 64 * 2 * 3
  assert permute["exposed_ici_bytes"] == permute["ici_bytes"] == 64 * 64 * 2


def test_group_sizes_in_the_three_spellings_of_replica_groups():
  assert hlo_stats.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=32] {'axis_1'}, x=1", 128) == 32
  assert hlo_stats.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=32] {'axis_0','axis_1'}", 128) == 128
  assert hlo_stats.group_size("replica_groups=[16,8]<=[8,16]T(1,0), use_global_device_ids=true", 128) == 8
  assert hlo_stats.group_size("replica_groups={{0,2},{1,3}}, to_apply=%add", 4) == 2
  assert hlo_stats.group_size("replica_groups={}, to_apply=%add", 4) == 4


def test_array_bytes_of_shapes():
  assert hlo_stats.array_bytes("(f32[2,3]{1,0}, s32[])") == 28
  assert hlo_stats.array_bytes("bf16[4,8192,128256]{2,1,0:T(8,128)(2,1)}") == 4 * 8192 * 128256 * 2


@pytest.mark.parametrize("objective", ["pretrain", "dpo", "dpo_packed"])
def test_the_tiny_config_compiles_for_a_v5p_slice_and_fits(objective):
  c = pretrain_tiny.get_config()
  c.objective = objective.split("_")[0]
  c.model.dtype = "bfloat16"
  c.mesh.data, c.mesh.fsdp = 1, -1
  if c.objective == "dpo":
    c.init_from, c.data.source = "/nonexistent/sft", "builtin"  # only checked, never read
  if objective == "dpo_packed":  # the step takes R rows of 2 seq_len tokens, G pair slots each
    c.data.pair_rows = c.batch_size // 2
    pack = pairs.Packing.of(c)
    batch = aot.batch_shapes(c, objectives.get("dpo"), sharding.make_mesh(c.mesh, jax.devices()[:1]))
    assert batch["tokens"].shape == (pack.rows, pack.row_len) == (c.batch_size // 2, 2 * c.seq_len)
    assert batch["ends"].shape == (pack.rows, pack.per_row, 2) and batch["weight"].shape == (pack.rows, pack.per_row)
  out = aot.report(c, "v5p-8")
  assert out["chips"] == 4 and out["chip"] == "TPU v5p" and out["fits"]
  mem = out["per_chip"]
  assert 0 < mem["peak_bytes"] < mem["hbm_bytes"]
  cfg = ModelConfig.from_config(c.model)
  # fp32 params split 4 ways over fsdp where the axis divides them: between a quarter and all.
  assert 4 * cfg.num_params() / 4 <= mem["params_bytes"] <= 4 * cfg.num_params()
  assert mem["opt_state_bytes"] >= 2 * mem["params_bytes"]  # Adam's mu and nu
  row_len = 2 * c.seq_len if objective == "dpo_packed" else c.seq_len  # packed: half the rows, twice as long
  tokens = c.batch_size * c.seq_len
  ref = 4 / 3 if c.objective == "dpo" else 1
  assert out["flops_per_step"] == pytest.approx(cfg.train_flops_per_token(row_len) * tokens * ref)
  assert out["collectives"]["all-gather"]["count"] > 0  # fsdp: weights are gathered before use
  r = out["roofline"]
  assert out["est_step_s"] >= max(r["compute_s"], r["hbm_s"]) + r["ici_waited_s"] > 0
  assert r["compute_s"] == out["compiled_flops_per_step"] / 4 / chips.CHIPS["v5p"].peak_flops
  assert math.isclose(out["est_mfu"], out["flops_per_step"] / (4 * chips.CHIPS["v5p"].peak_flops * out["est_step_s"]))


def test_fsdp_collectives_are_overlapped_and_weighed_against_the_ideal():
  """The tiny model scanned and rematerialized, fsdp over 4 chips: parameters are all-gathered,
  asynchronously under the overlap options (and not without them), gradients reduce-scattered.
  The ideal: every parameter gathered in the forward and in the recomputed backward and its
  gradient reduce-scattered, bf16, a chip sending 3/4 of each."""
  c = pretrain_tiny.get_config()
  c.model.dtype, c.model.scan_layers, c.model.remat = "bfloat16", True, "full"
  c.mesh.data, c.mesh.fsdp = 1, -1
  reports = {}
  for preset in ("overlap", "default"):
    c.compiler_options = preset
    reports[preset] = aot.report(c, "v5p-8")
  out = reports["overlap"]
  col = out["collectives"]
  assert col["all-gather"]["count"] > 0 and col["reduce-scatter"]["count"] > 0
  assert col["all-gather"]["async_bytes"] == col["all-gather"]["bytes"] > 0
  assert col["reduce-scatter"]["async_bytes"] == col["reduce-scatter"]["bytes"] > 0  # offloaded to SparseCores
  assert 0 <= out["exposed_ici_share"] < out["async_ici_share"]
  assert reports["default"]["async_share"] == 0 < out["async_share"]
  n_params = ModelConfig.from_config(c.model).num_params()
  assert out["fsdp"]["ideal_ici_bytes"] == int(3 * n_params * 2 * 3 / 4)
  sent = sum(k["ici_bytes"] for k in col.values())
  assert out["fsdp"]["ici_bytes"] == sent and out["fsdp"]["over_ideal"] == pytest.approx(sent / (3 * n_params * 1.5))
  assert out["async_ici_share"] == pytest.approx(sum(k["async_ici_bytes"] for k in col.values()) / sent)
  # What the chips compute: every matmul of the forward, the backward's two per forward matmul,
  # the recomputed forward of each layer but its last matmul (the MLP's down projection, whose
  # output the backward does not need), the LM head's three; and the splash kernels' tiles.
  m = ModelConfig.from_config(c.model)
  tokens = np.float64(c.batch_size * c.seq_len)
  qkv = m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim
  layer = qkv + m.n_heads * m.head_dim * m.d_model + 3 * m.d_model * m.mlp_dim    # weights of a layer's matmuls
  down = m.mlp_dim * m.d_model
  matmuls = tokens * (2 * m.n_layers * (3 * layer + layer - down) + 6 * m.vocab_size * m.d_model)
  kernels = out["kernel_flops_per_step"]
  assert kernels > 0 and out["unknown_kernels"] == []
  assert out["compiled_flops_per_step"] - kernels == matmuls
  assert out["compiled_flops_per_step"] >= out["flops_per_step"] and 0 < out["est_mfu"] <= 1
  with pytest.raises(UserError, match="config.compiler_options='fast': use overlap | default"):
    compiler_options.for_platform("fast", "tpu")


def test_cpu_runs_skip_an_installed_libtpu():
  """With libtpu installed and no TPU attached, JAX starts on the CPU without a word about TPUs."""
  code = "from train import cpu_tuning; cpu_tuning.apply(); import jax; print(jax.devices()[0].platform)"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and k not in topology.QUIET_ENV}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
  assert out.stdout.strip() == "cpu"
  assert "TPU" not in out.stderr, out.stderr


@pytest.mark.parametrize("objective", ["grpo", pytest.param("ppo", marks=pytest.mark.slow)])
def test_the_rl_programs_compile_for_a_v5p_slice_with_their_resident_arrays(objective):
  c = (ppo_arith if objective == "ppo" else grpo_arith).get_config()
  c.objective, c.init_from, c.rl.reward_model = objective, "/nonexistent/sft", ""  # only checked, never read
  c.model.dtype = "bfloat16"
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.batch_size, c.rl.num_generations, c.rl.num_minibatches = 8, 2, 1
  c.rl.max_prompt_len, c.rl.max_new_tokens, c.logits_chunk = 16, 16, 8
  out = aot.report(c, "v5p-8")
  assert out["chips"] == 4 and out["fits"]
  held = out["per_chip"]
  resident = {"params", "opt_state", "reference"} | ({"critic", "critic_opt_state"} if objective == "ppo" else set())
  assert {k[:-len("_bytes")] for k in held} == resident | {"hbm", "resident"}
  assert held["resident_bytes"] == sum(held[f"{k}_bytes"] for k in resident)
  assert held["reference_bytes"] == held["params_bytes"] if objective == "grpo" else True
  progs = out["programs"]
  assert set(progs) == {"update", "prefill", "decode_step"}
  for name, p in progs.items():
    mem = p["per_chip"]
    assert p["fits"] and 0 < mem["peak_bytes"] <= mem["need_bytes"] < mem["hbm_bytes"], name
    assert p["flops_per_step"] > 0 and p["est_step_s"] > 0 and "all-gather" in p["collectives"], name
  # the update takes the policy, its optimizer state (and the critic's); the rollout only the policy
  assert progs["update"]["per_chip"]["resident_elsewhere_bytes"] == held["reference_bytes"]
  assert progs["prefill"]["per_chip"]["resident_elsewhere_bytes"] == held["resident_bytes"] - held["params_bytes"]
  assert progs["update"]["per_chip"]["argument_bytes"] >= held["params_bytes"] + held["opt_state_bytes"]
  # decode_step takes the KV cache of every layer: 2 x [layers, rows, kv heads, P - 1 + T, head_dim]
  cfg = ModelConfig.from_config(c.model)
  cache = 2 * cfg.n_layers * c.batch_size * cfg.n_kv_heads * (16 - 1 + 16) * cfg.head_dim * 2 // 4  # bf16 / 4 chips
  assert progs["decode_step"]["per_chip"]["argument_bytes"] >= held["params_bytes"] + cache


def test_the_error_of_a_report_that_does_not_fit_names_the_program():
  mem = lambda need: {"hbm_bytes": 95 * aot.GiB, "peak_bytes": need - aot.GiB, "need_bytes": need}
  big = [{"shape": "bf16[32,16,8,1535,128]", "bytes": 3 * aot.GiB // 2, "op": "copy"}]
  out = {"fits": False, "programs": {"update": {"fits": True, "per_chip": mem(12 * aot.GiB), "largest_buffers": []},
                                     "decode_step": {"fits": False, "per_chip": mem(100 * aot.GiB),
                                                     "largest_buffers": big}}}
  err = aot._too_big(out)
  assert "the decode_step needs 100.0 GiB per chip, 95 GiB available" in str(err)
  assert "bf16[32,16,8,1535,128] (1.5 GiB, copy)" in str(err) and "config.batch_size" in err.hint


def test_the_chunked_lm_head_gathers_its_kernel_once_whatever_its_chunks():
  """The tiny model on data 2 x fsdp 2 chips, its LM head in 2 and in 8 chunks: the kernel bf16[64,
  512] is all-gathered once per step (not in every chunk and recomputed chunk), and its gradient
  reduce-scattered once over fsdp to bf16[32, 512] and that all-reduced over data (never the
  whole kernel all-reduced), so no collective grows with the chunks."""
  c = pretrain_tiny.get_config()
  c.model.dtype, c.model.scan_layers, c.model.remat = "bfloat16", True, "full"
  c.mesh.data, c.mesh.fsdp = 2, -1
  mesh = sharding.make_mesh(c.mesh, topology.devices("v5p-8"))
  d, vocab = c.model.d_model, c.model.vocab_size
  found = {}
  for chunks in (2, 8):
    c.logits_chunk = c.seq_len // chunks
    hlo = aot.lower_train_step(c, mesh)[0].compile().as_text()
    every = hlo_stats.collective_runs(*hlo_stats.parse(hlo), 4)
    runs = lambda kind, shape: sum(r.times for r in every if r.kind == kind and shape in r.shape)  # noqa: E731
    head = {op: runs(op, shape) for op, shape in (("all-gather", f"bf16[{d},{vocab}]"),
                                                  ("reduce-scatter", f"bf16[{d // 2},{vocab}]"),
                                                  ("all-reduce", f"bf16[{d // 2},{vocab}]"))}
    assert runs("all-reduce", f"bf16[{d},{vocab}]") == 0, chunks
    col = hlo_stats.stats(hlo, 4)["collectives"]
    found[chunks] = head, {k: (v["count"], v["bytes"]) for k, v in col.items()}
  assert found[2][0] == found[8][0] == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1}, found
  assert found[2][1] == found[8][1], found
