"""Hugging Face interop: tiny random Llama / Qwen2 / Mistral checkpoints built locally (no download),
imported into Kiln (logit parity, greedy generation), exported back (bitwise), LoRA-merged export,
tokenizers (sentencepiece tokenizer.model, tokenizer.json BPE), init_from="hf:DIR", bad input."""
import io
import json
import os
import random
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from configs import sections, tools  # noqa: E402
from model import convert, decode, hf_config, hf_tokenizer, sharding  # noqa: E402
from model.transformer import ModelConfig, Transformer  # noqa: E402
from train import rundir  # noqa: E402
from train.params import abstract_params  # noqa: E402
from tests import _cli  # noqa: E402

VOCAB = 128
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        **SHAPE, rope_theta=500_000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}),
    "qwen2": lambda: transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SHAPE, sliding_window=None),
}


def make_hf(family: str, out: str, seed: int = 0, vocab: int = VOCAB) -> str:
  """A random HF model of `family` saved in several safetensors shards (+ index) under `out`."""
  torch.manual_seed(seed)
  cfg = FAMILIES[family]()
  cfg.vocab_size = vocab
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # weights big enough that every path matters (norms and biases too)
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 else 0.0))
  model.save_pretrained(out, max_shard_size="20KB")
  return out


def hf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def kiln_load(hf_dir, mesh, scan_layers=False):
  """(ModelConfig, params) of an HF directory, loaded through restore_params' hf: path."""
  m = dict(hf_config.to_model(hf_config.read(hf_dir)), dtype="float32", param_dtype="float32",
           scan_layers=scan_layers, remat="none", attention="xla", init_std=0.02)
  cfg = ModelConfig.from_config(m)
  abstract, shardings, _, _ = abstract_params(Transformer(cfg), 8, mesh)
  params, step = rundir.restore_params("hf:" + hf_dir, abstract, shardings)
  assert step == 0
  return cfg, params


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
  d = str(tmp_path_factory.mktemp(request.param))
  return request.param, make_hf(request.param, d, seed=len(request.param))


@pytest.mark.eight_devices
def test_families_match_transformers_logits_and_greedy_generation(family_dir, mesh):
  family, d = family_dir
  assert len(json.load(open(os.path.join(d, convert.INDEX)))["weight_map"]) > 0
  assert len(set(json.load(open(os.path.join(d, convert.INDEX)))["weight_map"].values())) > 2
  cfg, params = kiln_load(d, mesh)
  assert cfg.n_kv_heads < cfg.n_heads
  assert cfg.qkv_bias == (family == "qwen2") and cfg.tie_embeddings == (family == "qwen2")
  assert (cfg.rope_scaling is not None) == (family == "llama")
  ref = hf_model(d)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  with sharding.use_mesh(mesh):
    got = np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(params, tokens))
  diff = float(np.abs(got - want).max())
  print(f"{family}: max |kiln - transformers| logit = {diff:.2e} (logit scale {np.abs(want).max():.1f})")
  assert diff < 1e-4

  prompt = tokens[:1, :6]
  with torch.no_grad():
    hf_out = ref.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)),
                          max_new_tokens=20, min_new_tokens=20, do_sample=False,
                          pad_token_id=0, eos_token_id=None).numpy()[0, 6:]
  out = decode.generate(jax.device_get(params), cfg, prompt, max_new_tokens=20, temperature=0.0, phases=1)
  np.testing.assert_array_equal(np.asarray(out.tokens)[0], hf_out)


def everything(path: str) -> dict:
  """{name: array} of every tensor of a HF directory's shards."""
  files = set(json.load(open(os.path.join(path, convert.INDEX)))["weight_map"].values())
  return {k: v for f in files for k, v in load_file(os.path.join(path, f)).items()}


def assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.eight_devices
def test_round_trip_is_bitwise(family_dir, mesh, tmp_path):
  family, d = family_dir
  cfg, params = kiln_load(d, mesh)
  model = hf_config.to_model(hf_config.read(d))
  tensors = convert.to_hf_tensors(jax.device_get(params), model)
  convert.save_hf(tensors, hf_config.from_model(model, hf_config.read(d)), str(tmp_path), 16 << 10)
  assert_same_tensors(everything(d), everything(str(tmp_path)))
  assert hf_config.to_model(hf_config.read(str(tmp_path))) == model
  _, stacked = kiln_load(d, mesh, scan_layers=True)  # layers/block/... [layers, ...]
  assert stacked["layers"]["block"]["attn"]["qkv"].shape == (2,) + params["layer_0"]["attn"]["qkv"].shape
  assert_same_tensors(convert.to_hf_tensors(jax.device_get(stacked), model), tensors)


@pytest.mark.parametrize("family_dir", ["qwen2"], indirect=True)  # bias and tied embeddings
def convert_config(**overrides):
  c = tools.convert()
  c.update(overrides)
  return c


def test_the_command_line_imports_and_refuses_two_directions(tmp_path):
  """`python -m train.rundir --workdir DIR --config.import_hf=HF_DIR`, as a user types it."""
  d = make_hf("llama", str(tmp_path / "hf"), seed=0)
  run = str(tmp_path / "run")
  out = _cli.run([sys.executable, "-m", "train.rundir", "--workdir", run, f"--config.import_hf={d}"], timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.isdir(os.path.join(run, "checkpoints", "0")) and os.path.isfile(os.path.join(run, "config.json"))
  with pytest.raises(ValueError, match="config.import_hf"):
    rundir.convert_hf(run, convert_config(import_hf=d, export_hf=str(tmp_path / "out")))


def test_cli_round_trip_through_a_kiln_run_dir_is_bitwise(family_dir, tmp_path):
  """`import_hf` (a run dir that init_from and eval read) then `export_hf`: the same code for every family."""
  family, d = family_dir
  rundir.convert_hf(str(tmp_path / "run"), convert_config(import_hf=d))
  rundir.convert_hf(str(tmp_path / "run"), convert_config(export_hf=str(tmp_path / "out"), max_shard_mb=0.02))
  assert len(set(json.load(open(tmp_path / "out" / convert.INDEX))["weight_map"].values())) > 2
  assert_same_tensors(everything(d), everything(str(tmp_path / "out")))


@pytest.mark.eight_devices
def test_lora_merged_export_loads_in_transformers_and_matches_kiln(tmp_path, mesh):
  """A LoRA run over init_from="hf:DIR" (adapters written by hand) -> `--to hf` -> transformers."""
  import logging
  import shutil
  import ml_collections
  import orbax.checkpoint as ocp
  from model import lora
  hf_dir = make_hf("qwen2", str(tmp_path / "hf"), seed=3)
  cfg, params = kiln_load(hf_dir, mesh)
  # A LoRA run dir as train/ writes it: adapters as params; base and lora config in meta.
  lora_cfg = ml_collections.ConfigDict(dict(rank=2, alpha=4.0, targets=list(sections.LORA_TARGETS)))
  adapters = lora.init_adapters(jax.device_get(params), lora_cfg, jax.random.key(1))
  adapters = jax.tree.map(lambda x: np.asarray(x) + 0.05, adapters)  # b != 0: the merge matters
  run = str(tmp_path / "lora_run")
  mngr = rundir.manager(run, keep=1, async_save=False)
  mngr.save(1, args=ocp.args.Composite(
      params=ocp.args.StandardSave(adapters),
      meta=ocp.args.JsonSave({"step": 1, "lora": {"base": "hf:" + hf_dir, "config": lora_cfg.to_dict()}})))
  mngr.wait_until_finished()
  mngr.close()
  from configs import base
  c = base.base_config()
  c.model.update(hf_config.to_model(hf_config.read(hf_dir)))
  (tmp_path / "lora_run" / "config.json").write_text(c.to_json())
  shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(run, "hf_config.json"))
  out = str(tmp_path / "export")
  rundir.convert_hf(run, convert_config(export_hf=out))

  merged, _ = rundir.restore_params(run, *abstract_params(Transformer(cfg), 8, mesh)[:2])
  tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 16))
  forward = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens))
  with sharding.use_mesh(mesh):
    want, before = np.asarray(forward(merged)), np.asarray(forward(params))
  assert np.abs(want - before).max() > 1e-2  # the adapters changed the function
  buf = io.StringIO()
  handler = logging.StreamHandler(buf)
  logging.getLogger("transformers").addHandler(handler)
  try:
    ref = hf_model(out)
  finally:
    logging.getLogger("transformers").removeHandler(handler)
  assert buf.getvalue() == "", buf.getvalue()  # no missing / unexpected keys, no config warnings
  assert type(ref).__name__ == "Qwen2ForCausalLM"
  with torch.no_grad():
    got = ref(torch.tensor(tokens)).logits.numpy()
  assert np.abs(got - want).max() < 1e-4


# ------------------------------------------------------------------------------------ tokenizers

WORDS = ("the quick brown fox jumps over a lazy dog . hello world naïve café Ünïcödé 日本語 "
         "emoji 🙂 42 2024 tab\tand new\nline").split(" ")
STRINGS = ["Hello world", " leading space", "two  spaces  ", "naïve café 日本語 🙂", "",  "  ",
           "tab\there\nnext line", "digits 12345", "<s>hello</s>", "x</s> y", "a<|im_start|>user\nhi<|im_end|>\n",
           "<|im_start|>assistant\n42<|im_end|>", "unseen ✓ ∑ Ωmega"]


def corpus(n=400, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]


def test_sentencepiece_tokenizer_model_matches_transformers(tmp_path):
  import sentencepiece as spm
  w = io.BytesIO()  # Llama-2 style: unk 0, <s> 1, </s> 2, dummy prefix, byte fallback, no normalization
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_writer=w, model_type="bpe", vocab_size=320, unk_id=0,
      bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
      user_defined_symbols=["<|im_start|>", "<|im_end|>"], num_threads=1, minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(w.getvalue())
  mine = hf_tokenizer.load_tokenizer(str(tmp_path))
  ref = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), add_bos_token=False, legacy=False)
  assert (mine.bos_id, mine.eos_id, mine.im_start_id, mine.im_end_id) == (1, 2, 3, 4)
  for s in STRINGS:
    ids = mine.encode(s)
    assert ids == ref.encode(s, add_special_tokens=False), s
    assert mine.decode(ids) == ref.decode(ids), s
  assert mine.encode("hi", add_bos=True, add_eos=True)[::len(mine.encode("hi")) + 1] == [1, 2]


def bpe_tokenizer_json(directory, vocab: int = 400) -> str:
  """A byte-level BPE tokenizer.json (Llama-3 / Qwen style) trained on local text, with specials."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus(), trainers.BpeTrainer(
      vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
               "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  return directory


def test_tokenizer_json_bpe_matches_transformers(tmp_path):
  bpe_tokenizer_json(str(tmp_path))
  from model import tokenizer as kiln_tokenizer
  mine = hf_tokenizer.load_tokenizer(str(tmp_path))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert mine.bos_id == ref.convert_tokens_to_ids("<|begin_of_text|>")
  assert mine.eos_id == ref.convert_tokens_to_ids("<|end_of_text|>")
  assert mine.im_end_id == ref.convert_tokens_to_ids("<|im_end|>")
  for s in STRINGS + ["<|begin_of_text|>Hi<|end_of_text|>"]:
    ids = mine.encode(s)
    assert ids == ref.encode(s, add_special_tokens=False), s
    assert mine.decode(ids) == ref.decode(ids) == s, s
  ids, mask = kiln_tokenizer.apply_chat_template(
      mine, [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}])
  assert ids.count(mine.im_start_id) == 2 and ids.count(mine.im_end_id) == 2 and sum(mask) == 2
  import pickle
  assert pickle.loads(pickle.dumps(mine)).encode(STRINGS[3]) == mine.encode(STRINGS[3])


# ------------------------------------------------------------------------------------ init_from


def test_sft_runs_two_steps_from_an_hf_directory(tiny_config, tmp_path):
  from configs import sft_tiny
  from train import loop
  hf_dir = make_hf("llama", str(tmp_path / "hf"), vocab=512)
  bpe_tokenizer_json(hf_dir, vocab=400)  # the run tokenizes with the directory's tokenizer.json
  c = sft_tiny.get_config()
  c.data.cache_dir = tiny_config().data.cache_dir
  c.data.num_documents = 200
  c.seq_len, c.batch_size, c.steps = 32, 8, 2
  # Every built-in conversation is longer than 32 tokens: cut them, with a loss on every token kept.
  c.data.overlong, c.data.train_on_prompt = "truncate", True
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 1, 0, 2, 1
  c.async_checkpoints = False
  c.init_from = "hf:" + hf_dir
  c.tokenizer.path = ""
  run = str(tmp_path / "run")
  out = loop.train(c, run)
  assert out["step"] == 2 and np.isfinite(out["train/loss"])
  saved = json.load(open(os.path.join(run, "config.json")))["model"]
  assert saved["d_model"] == 32 and saved["vocab_size"] == 512 and saved["rope_scaling"]["factor"] == 8.0
  assert json.load(open(os.path.join(run, "config.json")))["tokenizer"]["path"] == hf_dir
  assert os.path.isfile(os.path.join(run, "hf_config.json"))

  c.model.n_layers = 3  # a shape set by hand that conflicts with config.json
  with pytest.raises(ValueError, match=r"config.model.n_layers=3 but .*config.json gives 2"):
    loop.train(c, str(tmp_path / "bad"))


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.eight_devices
def test_bad_directories_name_the_file_and_key(tmp_path, mesh):
  with pytest.raises(ValueError, match=r"empty/config.json"):  # a UserError
    hf_config.read(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match=r"model_type='gpt2'"):
    hf_config.to_model({"model_type": "gpt2"}, "x/config.json")
  d = make_hf("mistral", str(tmp_path / "hf"))
  index = json.load(open(os.path.join(d, convert.INDEX)))
  del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  json.dump(index, open(os.path.join(d, convert.INDEX), "w"))
  with pytest.raises(KeyError, match=r"model.safetensors.index.json.*model.layers.1.mlp.up_proj.weight"):
    kiln_load(d, mesh)
