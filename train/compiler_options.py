"""XLA options of the train step, by platform (`config.compiler_options`).

"overlap" (the default) makes FSDP's collectives asynchronous, so each layer's parameter
all-gather and gradient reduce-scatter run while the neighbouring layers compute. On TPU these are
the LIBTPU_INIT_ARGS MaxText trains with on v5p (continuation fusion of all-gathers into the
compute that follows them, async collectives, the all-gathers of the rematerialized backward
pipelined, reduce-scatters and all-reduces offloaded to the SparseCores, no collective matmuls);
on NVIDIA GPUs the latency-hiding scheduler with pipelined all-gathers and reduce-scatters.
"default" leaves XLA's own choices. The same options go to the step `python -m train` runs
(train/loop.py) and to the one `python -m train.aot` compiles for a TPU slice; a platform without
an entry (CPU) gets none.
"""
from configs.errors import UserError

TPU_OVERLAP = {
    "xla_tpu_enable_async_collective_fusion": True,
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": True,
    "xla_tpu_enable_async_collective_fusion_fuse_reduce_scatter": True,
    "xla_tpu_enable_async_collective_fusion_multiple_steps": True,
    "xla_tpu_overlap_compute_collective_tc": True,
    "xla_enable_async_all_gather": True,
    "xla_enable_async_all_reduce": True,
    "xla_enable_async_collective_permute": True,
    "xla_tpu_enable_ag_backward_pipelining": True,
    "xla_tpu_megacore_fusion_allow_ags": False,
    "xla_tpu_enable_data_parallel_all_reduce_opt": True,
    "xla_tpu_data_parallel_opt_different_sized_ops": True,
    # gradients reduce-scattered (else all-reduced whole, then sliced); the layout flags are
    # MaxText's LAYOUT_FOR_ALL_REDUCE_SCATTER: without them the LM head's [4096, 128256] is not
    "xla_tpu_enable_reduce_scatter_legalizer": True,
    "xla_tpu_use_minor_sharding_for_major_trivial_input": True,
    "xla_tpu_relayout_group_size_threshold_for_reduce_scatter": 1,
    "xla_tpu_assign_all_reduce_scatter_layout": True,
    # reduce-scatters and all-reduces run on the SparseCores (v4, v5p, v6e; others ignore these),
    # asynchronously: on the TensorCore XLA:TPU makes every reduce-scatter a synchronous fusion
    "xla_tpu_enable_sparse_core_collective_offload_reduce_scatter": True,
    "xla_tpu_enable_sparse_core_collective_offload_all_reduce": True,
    "xla_tpu_enable_sparse_core_offload_queuing_in_lhs": True,   # scheduled as queued: 8B peak 16 -> 12 GiB
    # no collective matmuls: with few rows a chip (an RL update: 4 x 1535) XLA turns each layer's
    # gather + matmul into a loop of collective-permutes that reads the activations once a hop
    # (grpo_llama3_8b's update: HBM 2.31 -> 0.72 s a step; docs/performance.md)
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}
GPU_OVERLAP = {
    "xla_gpu_enable_latency_hiding_scheduler": True,
    "xla_gpu_enable_pipelined_all_gather": True,
    "xla_gpu_enable_pipelined_reduce_scatter": True,
    "xla_gpu_enable_pipelined_all_reduce": True,
    "xla_gpu_enable_while_loop_double_buffering": True,
}
PRESETS = {"overlap": {"tpu": TPU_OVERLAP, "gpu": GPU_OVERLAP}, "default": {}}


def for_platform(preset: str, platform: str) -> dict:
  """The compile options of `preset` for a platform ("cpu", "gpu", "tpu"); {} where none apply."""
  if preset not in PRESETS:
    raise UserError(f"config.compiler_options={preset!r}: use {' | '.join(PRESETS)}")
  return dict(PRESETS[preset].get(platform, {}))
