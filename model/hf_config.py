"""Hugging Face `config.json` <-> Kiln `config.model`, for the Llama family (llama, mistral, qwen2).

Only architectures Kiln computes exactly are accepted: SwiGLU MLP without bias, RMSNorm, RoPE
(plain or Llama-3 scaled), GQA, optional q/k/v bias (qwen2), optional tied embeddings. Anything
else fails with an error naming the file and the key. Mistral's `sliding_window` is not applied:
Kiln attends to the whole context, which is exact up to that many positions.
"""
import json
import os

from configs.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# config.model keys that fix the shape of the params or the function they compute.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
              "rope_theta", "rope_scaling", "norm_eps", "qkv_bias", "tie_embeddings")
NO_SCALING = dict(factor=0.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)


def read(hf_dir: str) -> dict:
  """The parsed `config.json` of a Hugging Face checkpoint directory."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{path} not found: a Hugging Face checkpoint directory needs config.json")
  with open(path) as f:
    return json.load(f)


def _rope(hf: dict, where: str):
  """(theta, Kiln rope_scaling dict) from `rope_parameters` (transformers 5) or `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, dict(NO_SCALING)
  if kind != "llama3":
    raise UserError(f"{where}: rope_type={kind!r} is not supported (only default and llama3)")
  return theta, dict(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                     high_freq_factor=float(params["high_freq_factor"]),
                     original_max_positions=int(params["original_max_position_embeddings"]))


def to_model(hf: dict, where: str = "config.json") -> dict:
  """Kiln `config.model` shape keys of a HF config dict; `where` names the file in errors."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise UserError(f"{where}: model_type={family!r} is not supported; expected one of {FAMILIES}")
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
  for key in ("mlp_bias", "attention_bias"):
    if hf.get(key):
      raise UserError(f"{where}: {key}=true is not supported (Kiln's kernels have no such bias)")
  theta, scaling = _rope(hf, where)
  n_heads = int(hf["num_attention_heads"])
  return dict(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
      n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
      mlp_dim=int(hf["intermediate_size"]), rope_theta=theta, rope_scaling=scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=family == "qwen2",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def normalized(model: dict) -> dict:
  """The shape keys of a `config.model`, with head_dim 0 and scaling factor 0 spelled out."""
  m = {k: model[k] for k in SHAPE_KEYS}
  m["head_dim"] = m["head_dim"] or m["d_model"] // m["n_heads"]
  scaling = dict(m["rope_scaling"] or {})
  m["rope_scaling"] = scaling if scaling.get("factor", 0) > 0 else dict(NO_SCALING)
  m["rope_theta"], m["norm_eps"] = float(m["rope_theta"]), float(m["norm_eps"])
  return m


def from_model(model: dict, base: dict = None, dtype: str = "float32") -> dict:
  """A HF config dict for Kiln `config.model` shape keys, keeping the other entries of `base` (the
  config.json the model came from, if any). Without `base`: qwen2 if qkv_bias, else llama."""
  m = normalized(model)
  base = dict(base or {})
  family = base.get("model_type") or ("qwen2" if m["qkv_bias"] else "llama")
  if m["qkv_bias"] != (family == "qwen2"):
    raise UserError(f"config.model.qkv_bias={m['qkv_bias']} cannot be written as model_type={family!r}")
  for key in ("rope_scaling", "rope_theta", "torch_dtype", "transformers_version"):
    base.pop(key, None)
  rope = {"rope_theta": m["rope_theta"], "rope_type": "default"}
  if m["rope_scaling"]["factor"] > 0:
    s = m["rope_scaling"]
    rope.update(rope_type="llama3", factor=s["factor"], low_freq_factor=s["low_freq_factor"],
                high_freq_factor=s["high_freq_factor"],
                original_max_position_embeddings=s["original_max_positions"])
  base.update(
      model_type=family, architectures=[ARCHITECTURES[family]], vocab_size=m["vocab_size"],
      hidden_size=m["d_model"], num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
      num_key_value_heads=m["n_kv_heads"], head_dim=m["head_dim"], intermediate_size=m["mlp_dim"],
      rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"], hidden_act="silu",
      rope_parameters=rope, dtype=dtype)
  if family == "llama":
    base.update(attention_bias=False, mlp_bias=False)
  return base
