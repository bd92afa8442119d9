"""Print completions from the latest checkpoint of a run.

  python -m eval.sample --workdir runs/pretrain_tiny --prompt "What is 2 + 2?"
  python -m eval.sample --workdir runs/sft --prompt "What is 2 + 2?" --chat --num 4 \
      --temperature 0.8 --top_p 0.9 --top_k 0 --max_new_tokens 64 --seed 0

Rebuilds the model and tokenizer from DIR/config.json, restores the params sharded over the run's
mesh (or a data-parallel mesh of the local devices if that one does not fit), and samples with
`model.decode.generate_text`. --temperature 0 is greedy; --beam K prints beam search instead.
"""
import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from model import decode, sharding
from model.tokenizer import apply_chat_template, stop_id
from model.transformer import ModelConfig, Transformer
from train import cpu_tuning


def load(workdir: str, step=None):
  """(config, model cfg, params, tokenizer, mesh, step) of a run directory."""
  from train import checkpoint, data
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError:  # the run's mesh needs other devices: plain data parallel here
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  cfg = ModelConfig.from_config(config.model)
  boxed = jax.eval_shape(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                         jax.random.key(0))
  params, step = checkpoint.restore_params(workdir, nn.meta.unbox(boxed),
                                           sharding.tree_shardings(boxed, mesh), step)
  return config, cfg, params, data.load_or_train_tokenizer(config), mesh, step


def beam_text(params, cfg, tok, prompt: str, chat: bool, template: str, width: int, max_new_tokens: int):
  """[(text, score)] of the beams of one prompt, best first."""
  if chat:
    ids = apply_chat_template(tok, [{"role": "user", "content": prompt}], template, True)[0]
    stops = [stop_id(tok, template), tok.eos_id]
  else:
    ids, stops = tok.encode(prompt, add_bos=True), [tok.eos_id]
  seqs, scores, _, lengths = decode.beam_generate(params, cfg, np.array([ids]), width=width,
                                                  max_new_tokens=max_new_tokens, stop_ids=stops,
                                                  pad_id=tok.pad_id)
  out = []
  for row, score, n in zip(np.asarray(seqs[0]), np.asarray(scores[0]), np.asarray(lengths[0])):
    row = [int(t) for t in row[:n]]
    out.append((tok.decode(row[:-1] if row and row[-1] in stops else row), float(score)))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description="Sample completions from a Kiln checkpoint.")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
  ap.add_argument("--chat", action="store_true", help="wrap in the chat template, stop at end of turn")
  ap.add_argument("--num", type=int, default=1, help="samples per prompt")
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--top_k", type=int, default=0)
  ap.add_argument("--max_new_tokens", type=int, default=64)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  ap.add_argument("--beam", type=int, default=0, help="beam width; 0 = sample")
  a = ap.parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only checkpoint is read only
  config, cfg, params, tok, mesh, step = load(a.workdir, a.step)
  template = config.data.get("chat_template", "chatml")
  print(f"# {a.workdir} step {step} | {cfg.num_params() / 1e6:.2f}M params")
  if a.beam:  # one prompt at a time: width rows need not divide over the mesh
    for p in a.prompt:
      for i, (text, score) in enumerate(beam_text(params, cfg, tok, p, a.chat, template, a.beam,
                                                  a.max_new_tokens)):
        print(f"--- {p!r} beam {i} (score {score:.3f})\n{text}")
    return
  with sharding.use_mesh(mesh):
    texts = decode.generate_text(params, cfg, tok, a.prompt, a.chat, key=jax.random.key(a.seed),
                                 max_new_tokens=a.max_new_tokens, num_samples=a.num,
                                 temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                 template=template, mesh=mesh)
  for p, samples in zip(a.prompt, texts):
    for i, text in enumerate(samples):
      print(f"--- {p!r} sample {i}\n{text}")


if __name__ == "__main__":
  cpu_tuning.apply()
  main()
