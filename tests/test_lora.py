"""LoRA: step 0 equals the base, merging is W + (alpha/r) A @ B, the model applies adapters
unmerged with the same losses and gradients, no kernel-sized product in a step, only adapters train."""
import re

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import models, sections, sft_tiny
from model import lora, quant, sharding
from model.transformer import ModelConfig, Transformer
from train import loop, objectives, optim, rundir
from train.params import abstract_params

LORA = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, targets=list(sections.LORA_TARGETS)))


def tiny():
  cfg = ModelConfig.from_config(models.tiny())
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 10)), jnp.int32)
  params = sharding.unbox(model.init(jax.random.key(0), tokens))["params"]
  return model, params, tokens


def test_step_zero_equals_base():
  model, params, tokens = tiny()
  adapters = lora.init_adapters(params, LORA, jax.random.key(1))
  assert set(adapters) == {f"layer_{i}/{k}" for i in range(2)
                           for k in ("attn/qkv", "attn/out", "mlp/gate_up", "mlp/down")}
  merged = lora.merge(params, adapters, LORA)
  np.testing.assert_array_equal(model.apply({"params": merged}, tokens),
                                model.apply({"params": params}, tokens))


def test_merge_is_w_plus_scaled_low_rank_product():
  _, params, _ = tiny()
  adapters = lora.init_adapters(params, LORA, jax.random.key(1))
  rng = np.random.default_rng(3)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), adapters)
  merged = traverse.flatten_dict(lora.merge(params, adapters, LORA), sep="/")
  flat = traverse.flatten_dict(params, sep="/")
  for path, ab in adapters.items():
    w = np.asarray(flat[path], np.float64)
    n_in = np.asarray(ab["a"]).shape[0]
    x = rng.standard_normal((5, n_in))                      # a batch of inputs to this kernel
    a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
    want = x @ w.reshape(n_in, -1) + (LORA.alpha / LORA.rank) * (x @ a) @ b
    got = x @ np.asarray(merged[path], np.float64).reshape(n_in, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_lora_training_changes_only_adapters(tiny_config, tmp_path):
  """A QLoRA run (nf4 layer kernels, the rest in bf16): it stores only adapters, and reading it
  merges them into the base as the run held it (quantized and back), nothing else changed."""
  base_dir, lora_dir = str(tmp_path / "base"), str(tmp_path / "lora")
  loop.train(tiny_config(steps=2, checkpoint_every=2), base_dir)
  c = tiny_config(steps=6, checkpoint_every=6, objective="sft", init_from=base_dir)
  c.lora.rank, c.lora.alpha, c.lora.quantize, c.lora.base_dtype = 4, 8.0, "nf4", "bfloat16"
  c.optim.lr = 1e-2
  loop.train(c, lora_dir)

  mesh = sharding.make_mesh(c.mesh)
  model = Transformer(ModelConfig.from_config(c.model))
  abs_p, p_sh, _, _ = abstract_params(model, c.seq_len, mesh)
  base, _ = rundir.restore_params(base_dir, abs_p, p_sh)
  merged, step = rundir.restore_params(lora_dir, abs_p, p_sh)   # adapters folded into base
  assert step == 6
  # the LoRA run stored only adapters (kilobytes), not a second copy of the model
  raw = ocp.CheckpointManager(f"{lora_dir}/checkpoints", item_names=("params", "opt_state", "meta"))
  stored = raw.restore(6, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
  assert set(stored) == set(lora.targeted(base, LORA.targets))
  assert all(np.abs(np.asarray(v["b"])).max() > 0 for v in stored.values())   # adapters moved
  held = traverse.flatten_dict(quant.as_stored(jax.device_get(base), c.lora), sep="/")
  flat_b, flat_m = traverse.flatten_dict(base, sep="/"), traverse.flatten_dict(merged, sep="/")
  for path in flat_b:
    assert not np.array_equal(held[path], flat_b[path]) or "norm" in path, path  # bf16 / nf4 rounding
    same = np.array_equal(held[path], np.asarray(flat_m[path]))
    assert same == (path not in stored), path    # untouched unless adapted


def batch(b=2, t=24, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32),
          "segment_ids": jnp.ones((b, t), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
          "loss_mask": jnp.asarray(rng.random((b, t)) < 0.7, jnp.float32)}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_unmerged_forward_loss_and_gradients_equal_the_merged_path(scan_layers):
  """The model applying x @ W + (alpha/r) (x @ A) @ B (lora.attach) against the old path that
  builds W + (alpha/r) A @ B (lora.merge), random A and B, every target (the LM head is merged)."""
  m = models.tiny()
  m.scan_layers = scan_layers
  model = Transformer(ModelConfig.from_config(m))
  params = sharding.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  cfg = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, targets=list(sections.LORA_TARGETS) + ["lm_head$"]))
  rng = np.random.default_rng(3)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.05, jnp.float32),
                          lora.init_adapters(params, cfg, jax.random.key(1)))
  b = batch()
  for path in ("layers/block/attn/qkv", "layer_0/attn/qkv"):
    if path in adapters:
      assert adapters[path]["b"].ndim == 2 + scan_layers
  out = {}
  for name, to_params in (("merged", lora.merge), ("unmerged", lora.attach)):
    def f(a, base, b, to_params=to_params):  # (loss, logits [b, t, vocab])
      p = to_params(base, a, cfg)
      return objectives.next_token_loss(p, b, model)[0], model.apply({"params": p}, b["inputs"])
    out[name] = jax.jit(jax.value_and_grad(f, has_aux=True))(adapters, params, b)
  ((loss_u, logits_u), grads_u), ((loss_m, logits_m), grads_m) = out["unmerged"], out["merged"]
  np.testing.assert_allclose(logits_u, logits_m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss_u, loss_m, rtol=1e-6)
  for path in adapters:
    for k in ("a", "b"):
      g_m = np.asarray(grads_m[path][k])
      np.testing.assert_allclose(grads_u[path][k], g_m, rtol=1e-4, atol=1e-5 * np.abs(g_m).max(), err_msg=path)
      assert np.abs(g_m).max() > 0


def dot_output_shapes(text: str) -> list:
  """Output shapes of every dot_general in a lowered (StableHLO) program."""
  return [tuple(int(d) for d in s.split("x")[:-1] if d)
          for s in re.findall(r"stablehlo\.dot_general[^\n]*-> tensor<((?:\d+x)+)\w+>", text)]


def test_the_lora_train_step_computes_no_kernel_sized_product():
  """No dot in the LoRA train step outputs a [in, out] kernel-sized array (a full-size dW, or a
  merged A @ B): the step of train/loop.py, against a gradient through lora.merge that does."""
  model, params, _ = tiny()
  c = sft_tiny.get_config()
  c.lora.rank = 4
  adapters = lora.init_adapters(params, c.lora, jax.random.key(1))
  kernel_shapes = set()
  for path, w in lora.targeted(params, c.lora.targets).items():
    _, n_in, n_out = lora._split(path, w.shape)
    kernel_shapes |= {(n_in, n_out), (n_out, n_in)}
  b = batch()  # 48 rows: no kernel dimension
  tx, lr_fn = optim.make_optimizer(c.optim, 10)
  step = loop.make_train_step(model, objectives.get("sft"), tx, lr_fn, 1, c.lora, c)
  shapes = dot_output_shapes(jax.jit(step).lower(adapters, tx.init(adapters), b, jnp.int32(0), params).as_text())
  assert len(shapes) > 20 and not kernel_shapes & set(shapes)
  merged = lambda a: objectives.next_token_loss(lora.merge(params, a, c.lora), b, model)[0]
  assert kernel_shapes & set(dot_output_shapes(jax.jit(jax.grad(merged)).lower(adapters).as_text()))
