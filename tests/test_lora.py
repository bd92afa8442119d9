"""LoRA: step 0 equals the base, merging is W + (alpha/r) A @ B, only adapters train."""
import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs import models, sections
from model import lora, sharding
from model.transformer import ModelConfig, Transformer
from train import loop, rundir
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
  base_dir, lora_dir = str(tmp_path / "base"), str(tmp_path / "lora")
  loop.train(tiny_config(steps=2, checkpoint_every=2), base_dir)
  c = tiny_config(steps=6, checkpoint_every=6, objective="sft", init_from=base_dir)
  c.lora.rank, c.lora.alpha = 4, 8.0
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
  flat_b, flat_m = traverse.flatten_dict(base, sep="/"), traverse.flatten_dict(merged, sep="/")
  for path in flat_b:
    same = np.array_equal(np.asarray(flat_b[path]), np.asarray(flat_m[path]))
    assert same == (path not in stored), path    # untouched unless adapted
