"""Quantized frozen LoRA base (model/quant.py): int8 and nf4 against a float64 NumPy quantizer,
losses against the float base, no full-precision base kept for the backward pass, the base's
bytes in train.aot, and the config checks."""
import re
import statistics

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import models, sections, sft_tiny
from configs.errors import UserError
from model import lora, quant, sharding
from model.transformer import ModelConfig, Transformer
from train import aot, objectives, topology
from train.validate import validate
from tests.test_lora import batch  # random packed rows [2, 24]


def lora_cfg(quantize="none", base_dtype="float32", block_size=64, rank=4):
  return ml_collections.ConfigDict(dict(rank=rank, alpha=8.0, targets=list(sections.LORA_TARGETS),
                                        base_dtype=base_dtype, quantize=quantize, block_size=block_size))


def np_quantize(w, axis, kind, block):
  """float64 reference: (codes, absmax per block, dequantized), blocks of `block` along `axis`."""
  w = np.moveaxis(np.asarray(w, np.float64), axis, -1)              # [..., n]
  n = w.shape[-1]
  b = min(block, n)
  wb = w.reshape(w.shape[:-1] + (n // b, b))
  s = np.abs(wb).max(-1, keepdims=True)
  x = wb / np.where(s > 0, s, 1.0)
  if kind == "int8":
    codes = np.round(x * 127)
    deq = codes / 127 * s
  else:
    codes = np.argmin(np.abs(x[..., None] - quant.NF4), -1)
    deq = quant.NF4[codes] * s
  back = lambda a: np.moveaxis(a.reshape(w.shape), -1, axis)
  return back(codes), np.moveaxis(s[..., 0], -1, axis), back(deq)


def test_nf4_levels_are_qloras_normal_quantiles():
  # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) from offset 0.9677083, and 0.
  ppf, offset = statistics.NormalDist().inv_cdf, 0.9677083
  pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(pos + neg + [0.0])
  np.testing.assert_allclose(quant.NF4, levels / levels.max(), atol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("shape, axis, block", [((2, 128, 3, 8), 1, 64), ((2, 2, 16, 24), 2, 64),
                                                ((96, 10), 0, 32)])
def test_quantize_dequantize_matches_a_float64_numpy_quantizer(kind, shape, axis, block):
  rng = np.random.default_rng(0)
  w = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, shape)).astype(np.float32)  # uneven blocks
  w[(0,) * len(shape)] = 0.0
  q = quant.quantize(jnp.asarray(w), axis, kind, block)
  codes, scale, deq = np_quantize(w, axis, kind, block)
  np.testing.assert_allclose(np.asarray(q["scale"]), scale, rtol=1e-7)
  got = np.asarray(q[kind]).astype(np.int64)
  if kind == "nf4":  # two codes per byte along the axis: entry 2i in the low nibble, 2i + 1 in the high
    got = np.stack([got & 15, got >> 4], axis + 1).reshape(shape)
  assert np.mean(got != codes) < 1e-3                  # float32 vs float64 at a decision boundary
  near = got != codes
  np.testing.assert_array_equal(np.abs(got - codes)[near], 1)
  out = np.asarray(quant.dequantize(q, axis, jnp.float32), np.float64)
  np.testing.assert_allclose(out[~near], deq[~near], rtol=1e-6, atol=1e-7)
  err = np.abs(out - w)
  s_full = np.repeat(scale, min(block, shape[axis]), axis)
  bound = 1 / 254 if kind == "int8" else np.max(np.diff(quant.NF4)) / 2   # half the widest step
  assert np.all(err <= s_full * bound * (1 + 1e-5) + 1e-8)
  print(kind, shape, "max error / absmax", float(np.max(err / np.where(s_full > 0, s_full, 1))))


def tiny(scan_layers=False):
  m = models.tiny()
  m.scan_layers = scan_layers
  model = Transformer(ModelConfig.from_config(m))
  params = sharding.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  return model, params


def stored(params, cfg):
  """The frozen base as train/state.py `frozen_base` stores it, on one device."""
  flat = traverse.flatten_dict(params, sep="/")
  return traverse.unflatten_dict({p: quant.store(p, w, cfg) for p, w in flat.items()}, sep="/")


def random_adapters(params, cfg, seed=3):
  rng = np.random.default_rng(seed)
  ad = lora.init_adapters(params, cfg, jax.random.key(1))
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.05, jnp.float32), ad)


def test_a_lora_step_on_a_quantized_base_is_close_to_the_float_base():
  """Loss and adapter gradients over the float32 base, then over an int8 base (the rest in bf16)
  and an nf4 base."""
  model, params = tiny()
  ad = random_adapters(params, lora_cfg())
  out = {}
  for quantize, base_dtype in (("none", "float32"), ("int8", "bfloat16"), ("nf4", "float32")):
    cfg = lora_cfg(quantize, base_dtype)
    f = lambda ad, base: objectives.next_token_loss(lora.attach(base, ad, cfg), batch(), model)[0]
    loss, grads = jax.jit(jax.value_and_grad(f))(ad, stored(params, cfg))
    out[quantize, base_dtype] = float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  loss, grads = out["none", "float32"]
  # relative deviations allowed (seen: int8 + bf16 3e-5, 1e-2; nf4 2e-4, 0.16)
  tols = {("int8", "bfloat16"): (2e-4, 3e-2), ("nf4", "float32"): (2e-3, 0.3)}
  for key, (loss_tol, grad_tol) in tols.items():
    dloss, dgrad = abs(out[key][0] - loss) / loss, np.linalg.norm(out[key][1] - grads) / np.linalg.norm(grads)
    print(key, f"loss {dloss:.1e}, gradient {dgrad:.1e} (relative)")
    assert 0 < dloss <= loss_tol and dgrad <= grad_tol, key


def test_the_backward_pass_keeps_no_dequantized_base():
  """Scanned layers over an int8 base: the gradient program holds no float32 stack of kernels
  [layers, in, out] (a dequantized copy of the whole base), only the int8 codes; the kernels are
  dequantized again in the backward pass, one layer at a time (model/dense.py)."""
  model, params = tiny(scan_layers=True)
  cfg = lora_cfg("int8")
  ad = lora.init_adapters(params, cfg, jax.random.key(1))
  loss = lambda ad, base: model.apply({"params": lora.attach(base, ad, cfg)}, batch()["inputs"]).sum()
  text = jax.jit(jax.grad(loss)).lower(ad, stored(params, cfg)).as_text()
  f32 = set(re.findall(r"tensor<((?:\d+x)+)f32>", text))
  i8 = set(re.findall(r"tensor<((?:\d+x)+)i8>", text))
  for path, w in traverse.flatten_dict(params, sep="/").items():
    if quant.quantized(path, "int8"):
      lead, n_in, n_out = lora._split(path, w.shape)
      assert "x".join(map(str, w.shape)) + "x" in i8, path
      for shape in (w.shape, lead + (n_in, n_out)):
        assert "x".join(map(str, shape)) + "x" not in f32, (path, shape)


@pytest.mark.parametrize("key, value, match", [
    ("lora.quantize", "int4", r"config\.lora\.quantize='int4': use none \| int8 \| nf4"),
    ("lora.base_dtype", "float16", r"config\.lora\.base_dtype='float16'"),
    ("lora.block_size", 48, r"config\.lora\.block_size=48 does not split config\.model\.d_model=64"),
    ("lora.block_size", 0, r"config\.lora\.block_size=0 must be > 0")])
def test_bad_quantization_keys_are_named(key, value, match):
  c = sft_tiny.get_config()
  c.init_from, c.lora.rank, c.lora.quantize = "runs/x", 8, "int8"
  c.update_from_flattened_dict({key: value})
  with pytest.raises(UserError, match=match):
    validate(c, 8)


def _base_bytes(quantize, base_dtype):
  c = sft_tiny.get_config()
  c.init_from = "/nonexistent/base"  # only shapes: aot never reads it
  c.lora.rank, c.lora.quantize, c.lora.base_dtype = 8, quantize, base_dtype
  mesh = sharding.make_mesh(c.mesh, topology.devices("v5p-8"))
  _, (adapters, frozen), opt, flops = aot.lower_train_step(c, mesh)
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  return nbytes(adapters), nbytes(frozen), nbytes(opt), flops / (c.batch_size * c.seq_len)


def test_aot_lowers_lora_over_the_stored_base():
  """train.aot's LoRA step takes adapters (trained, with their optimizer state) and the base as the
  run stores it: bytes of the tiny model's base = its kernels at 4 / 2 / 1 / 0.5 bytes + scales."""
  cfg = ModelConfig.from_config(models.tiny())
  kernels = cfg.n_layers * (cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
                            + cfg.n_heads * cfg.head_dim * cfg.d_model + 3 * cfg.d_model * cfg.mlp_dim)
  rest = cfg.num_params() - kernels
  # absmax scales: one per 64 inputs (qkv, gate_up: d_model; down: mlp_dim), per head (out: head_dim 16)
  scales = cfg.n_layers * ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 2 * cfg.mlp_dim
                           + 3 * cfg.d_model + cfg.n_heads * cfg.d_model)
  want = {("none", "float32"): 4 * (kernels + rest), ("none", "bfloat16"): 2 * (kernels + rest),
          ("int8", "float32"): kernels + 4 * scales + 4 * rest,
          ("nf4", "bfloat16"): kernels // 2 + 4 * scales + 2 * rest}
  for (quantize, base_dtype), base in want.items():
    adapters, frozen, opt, flops_per_token = _base_bytes(quantize, base_dtype)
    assert frozen == base, (quantize, base_dtype)
    ins_outs = (cfg.d_model + (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim     # qkv
                + cfg.n_heads * cfg.head_dim + cfg.d_model + cfg.d_model + 2 * cfg.mlp_dim + cfg.mlp_dim + cfg.d_model)
    assert adapters == 4 * 8 * cfg.n_layers * ins_outs            # float32 A [in, 8] and B [8, out]
    assert opt < 3 * adapters  # AdamW's mu and nu of the adapters (and a count), nothing of the base
    # no weight gradient of the frozen base: 2 forward + 2 for the activations' gradient per weight,
    # 6 per adapter parameter, attention's 12 * layers * heads * head_dim * seq as in full training
    weights = cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * sft_tiny.get_config().seq_len
    assert flops_per_token == pytest.approx(4 * weights + 6 * adapters / 4 + attention)
