"""Hugging Face safetensors checkpoints <-> Kiln param trees (Llama, Mistral, Qwen2): the pure
mapping of tensors and names. Run directories (import into one, export from one, `init_from="hf:DIR"`)
are train/rundir.py's.

Kiln fuses what HF keeps apart, with the same math (RoPE is rotate-half in both, so q/k need no
permutation). Per layer i, with HF weights stored [out, in]:

    attn/qkv  [embed, kv, group+2, hd] = q_proj [kv*group*hd, embed] as [kv, group, hd, embed],
                                         k_proj, v_proj [kv*hd, embed] as [kv, 1, hd, embed], transposed
    attn/qkv_bias [kv, group+2, hd]    = q/k/v_proj.bias (qwen2)
    attn/out  [kv, group, hd, embed]   = o_proj [embed, kv*group*hd]
    mlp/gate_up [embed, 2, mlp]        = gate_proj, up_proj [mlp, embed] transposed
    mlp/down  [mlp, embed]             = down_proj [embed, mlp] transposed

Loading reads the safetensors files (memory-mapped, NumPy only) one Kiln param at a time and puts
each straight into its NamedSharding with `jax.make_array_from_callback`: a host holds at most one
param, never the model. Only numpy and safetensors are needed to import this module.
"""
import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from model import hf_config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Reader:
  """Named tensors of a HF directory: `model.safetensors` or shards listed in the index file."""

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
      self.listing = index
      with open(index) as f:
        self.files = dict(json.load(f)["weight_map"])
    elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
      self.listing = os.path.join(hf_dir, SINGLE)
      with safe_open(self.listing, framework="numpy") as f:
        self.files = {k: SINGLE for k in f.keys()}
    else:
      raise FileNotFoundError(f"{hf_dir}: neither {INDEX} nor {SINGLE}: no safetensors weights")
    self._open = {}

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise KeyError(f"{self.listing}: tensor {name!r} is missing")
    file = self.files[name]
    if file not in self._open:
      path = os.path.join(self.dir, file)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} (listed in {INDEX} for {name!r}) not found")
      self._open[file] = safe_open(path, framework="numpy")
    return self._open[file].get_tensor(name)


def _dims(m: dict):
  m = hf_config.normalized(m)
  return m["n_kv_heads"], m["n_heads"] // m["n_kv_heads"], m["head_dim"], m["d_model"]


def layer_from_hf(key: str, get, i: int, m: dict) -> np.ndarray:
  """Kiln param `key` (e.g. "attn/qkv") of layer i, from `get(hf_name) -> array`."""
  kv, g, hd, d = _dims(m)
  p = f"model.layers.{i}."
  a = p + "self_attn."
  if key == "attn_norm/scale":
    return get(p + "input_layernorm.weight")
  if key == "mlp_norm/scale":
    return get(p + "post_attention_layernorm.weight")
  if key == "attn/qkv":
    q = get(a + "q_proj.weight").reshape(kv, g, hd, d)
    k = get(a + "k_proj.weight").reshape(kv, 1, hd, d)
    v = get(a + "v_proj.weight").reshape(kv, 1, hd, d)
    return np.concatenate([q, k, v], axis=1).transpose(3, 0, 1, 2)  # [d, kv, g+2, hd]
  if key == "attn/qkv_bias":
    q = get(a + "q_proj.bias").reshape(kv, g, hd)
    k, v = (get(a + f"{n}_proj.bias").reshape(kv, 1, hd) for n in "kv")
    return np.concatenate([q, k, v], axis=1)  # [kv, g+2, hd]
  if key == "attn/out":
    return get(a + "o_proj.weight").reshape(d, kv, g, hd).transpose(1, 2, 3, 0)
  if key == "mlp/gate_up":
    return np.stack([get(p + "mlp.gate_proj.weight").T, get(p + "mlp.up_proj.weight").T], axis=1)
  if key == "mlp/down":
    return get(p + "mlp.down_proj.weight").T
  raise KeyError(f"no Hugging Face tensor maps to Kiln param layer {i} {key!r}")


def layer_to_hf(layer: dict, i: int, m: dict) -> dict:
  """{hf_name: array} of one layer's flat Kiln params {"attn/qkv": ..., ...}."""
  kv, g, hd, d = _dims(m)
  p = f"model.layers.{i}."
  a = p + "self_attn."
  qkv = layer["attn/qkv"].transpose(1, 2, 3, 0)  # [kv, g+2, hd, d]
  out = {
      p + "input_layernorm.weight": layer["attn_norm/scale"],
      p + "post_attention_layernorm.weight": layer["mlp_norm/scale"],
      a + "q_proj.weight": qkv[:, :g].reshape(kv * g * hd, d),
      a + "k_proj.weight": qkv[:, g].reshape(kv * hd, d),
      a + "v_proj.weight": qkv[:, g + 1].reshape(kv * hd, d),
      a + "o_proj.weight": layer["attn/out"].transpose(3, 0, 1, 2).reshape(d, kv * g * hd),
      p + "mlp.gate_proj.weight": layer["mlp/gate_up"][:, 0].T,
      p + "mlp.up_proj.weight": layer["mlp/gate_up"][:, 1].T,
      p + "mlp.down_proj.weight": layer["mlp/down"].T,
  }
  if "attn/qkv_bias" in layer:
    b = layer["attn/qkv_bias"]  # [kv, g+2, hd]
    out.update({a + "q_proj.bias": b[:, :g].reshape(-1), a + "k_proj.bias": b[:, g].reshape(-1),
                a + "v_proj.bias": b[:, g + 1].reshape(-1)})
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def param_from_hf(path: str, get, m: dict) -> np.ndarray:
  """The full value of the Kiln param at `path` ("layer_3/attn/qkv", "layers/block/mlp/down" for
  scanned layers [layers, ...], "embedding", ...)."""
  if path == "embedding":
    return get("model.embed_tokens.weight")
  if path == "final_norm/scale":
    return get("model.norm.weight")
  if path == "lm_head":
    return get("lm_head.weight").T
  if path.startswith("layers/block/"):
    key = path[len("layers/block/"):]
    return np.stack([layer_from_hf(key, get, i, m) for i in range(m["n_layers"])])
  if path.startswith("layer_"):
    head, key = path.split("/", 1)
    return layer_from_hf(key, get, int(head[len("layer_"):]), m)
  raise KeyError(f"no Hugging Face tensor maps to Kiln param {path!r}")


def load_params(hf_dir: str, model: dict, abstract_params, shardings, missing_ok=()):
  """HF weights as a Kiln param tree laid out like `abstract_params` (ShapeDtypeStructs) with
  `shardings`; top-level entries named in `missing_ok` (e.g. a reward head) are left out.

  `model` is the Kiln config.model the tree was built from (it must be `hf_config.to_model` of the
  directory's config.json). Each param is read, cast to its dtype and placed shard by shard.
  """
  import flax.traverse_util as traverse
  import jax
  reader = Reader(hf_dir)
  flat = traverse.flatten_dict(abstract_params, sep="/")
  flat_sh = traverse.flatten_dict(shardings, sep="/")
  out = {}
  for path, abstract in flat.items():
    if path.split("/", 1)[0] in missing_ok:
      continue
    value = np.asarray(param_from_hf(path, reader.get, model), dtype=abstract.dtype)
    if value.shape != tuple(abstract.shape):
      raise ValueError(f"{hf_dir}: Kiln param {path} needs shape {tuple(abstract.shape)} but the "
                       f"checkpoint gives {value.shape} (is config.json consistent with the weights?)")
    out[path] = jax.make_array_from_callback(value.shape, flat_sh[path], lambda idx, v=value: v[idx])
    del value
  return traverse.unflatten_dict(out, sep="/")


def to_hf_tensors(params, model: dict) -> dict:
  """{hf_name: numpy array} of a Kiln param tree (host arrays or fully addressable jax.Arrays)."""
  import flax.traverse_util as traverse
  m = hf_config.normalized(model)
  flat = {k: np.asarray(v) for k, v in traverse.flatten_dict(params, sep="/").items()}
  out = {"model.embed_tokens.weight": flat["embedding"], "model.norm.weight": flat["final_norm/scale"]}
  if not m["tie_embeddings"]:
    out["lm_head.weight"] = np.ascontiguousarray(flat["lm_head"].T)
  for i in range(m["n_layers"]):
    if "layers/block/attn/qkv" in flat:  # scanned: [layers, ...]
      layer = {k[len("layers/block/"):]: v[i] for k, v in flat.items() if k.startswith("layers/block/")}
    else:
      layer = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(f"layer_{i}/")}
    out.update(layer_to_hf(layer, i, m))
  return out


def save_hf(tensors: dict, config: dict, out_dir: str, max_shard_bytes: int = 2 << 30) -> list:
  """Writes config.json, model-0000k-of-0000n.safetensors shards and their index; returns the files."""
  os.makedirs(out_dir, exist_ok=True)
  shards, size = [[]], 0
  for name in tensors:  # HF order: embedding, layers, norm, head
    n = tensors[name].nbytes
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  files, weight_map = [], {}
  for k, names in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: np.ascontiguousarray(tensors[n]) for n in names}, os.path.join(out_dir, file),
              metadata={"format": "pt"})
    weight_map.update({n: file for n in names})
    files.append(file)
  total = sum(int(t.nbytes) for t in tensors.values())
  with open(os.path.join(out_dir, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return files


def load_hf(hf_dir: str, abstract_params, shardings, missing_ok=()):
  """`load_params` with the model read from hf_dir/config.json (restore_params' hf: branch)."""
  hf_dir = os.path.expanduser(hf_dir)
  model = hf_config.to_model(hf_config.read(hf_dir), os.path.join(hf_dir, "config.json"))
  return load_params(hf_dir, model, abstract_params, shardings, missing_ok)
