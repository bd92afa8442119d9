"""Print completions from the latest checkpoint of a run.

  python -m eval.sample --workdir runs/pretrain_tiny --config.prompts="'What is 2 + 2?'"
  python -m eval.sample --workdir runs/sft --config.prompts="'What is 2 + 2?'" --config.chat=True \
      --config.num=4 --config.temperature=0.8 --config.top_p=0.9 --config.max_new_tokens=64

Options are configs/tools.py `sample()` (repeat --config.prompts=... for several prompts).
Rebuilds the model from DIR/config.json, takes the tokenizer the run stored in DIR/tokenizer/,
restores the params sharded over the run's mesh (or a data-parallel mesh of the local devices if
that one does not fit), and samples with `model.decode.generate_text`. config.temperature 0 is greedy;
config.beam K prints beam search instead.
A prompt whose tokens + config.max_new_tokens pass the run's config.seq_len (positions it was never
trained on) gets a warning line on stderr.
"""
import sys

from absl import logging
import jax
import numpy as np

from configs import tools
from model import decode, sharding
from model.tokenizer import apply_chat_template, stop_id
from train import cli, rundir


def load(workdir: str, step=None) -> rundir.LoadedRun:
  """A run directory on its own mesh, or on a data-parallel mesh of the local devices if that one
  does not fit."""
  config = rundir.load_config(workdir)
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError:  # the run's mesh needs other devices: plain data parallel here
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  return rundir.load_run(workdir, step, mesh)


def prompt_ids(tok, prompt: str, chat: bool, template: str) -> list[int]:
  """A prompt's token ids as sampling encodes them (chat: template + generation prompt; else bos + text)."""
  if chat:
    return apply_chat_template(tok, [{"role": "user", "content": prompt}], template, True)[0]
  return tok.encode(prompt, add_bos=True)


def context_warnings(tok, prompts, chat: bool, template: str, max_new_tokens: int, seq_len: int) -> list[str]:
  """One line per prompt whose tokens + max_new_tokens pass seq_len, the context the run was trained on."""
  out = []
  for i, p in enumerate(prompts):
    n = len(prompt_ids(tok, p, chat, template))
    if n + max_new_tokens > seq_len:
      out.append(f"warning: prompt {i + 1} is {n:,} tokens; with config.max_new_tokens={max_new_tokens} it "
                 f"reaches {n + max_new_tokens:,} positions, past the config.seq_len={seq_len} the run was "
                 f"trained on ({(n + max_new_tokens) / seq_len:.1f}x): shorten it or expect degraded text")
  return out


def beam_text(params, cfg, tok, prompt: str, chat: bool, template: str, width: int, max_new_tokens: int):
  """[(text, score)] of the beams of one prompt, best first."""
  ids = prompt_ids(tok, prompt, chat, template)
  stops = [stop_id(tok, template), tok.eos_id] if chat else [tok.eos_id]
  seqs, scores, _, lengths = decode.beam_generate(params, cfg, np.array([ids]), width=width,
                                                  max_new_tokens=max_new_tokens, stop_ids=stops,
                                                  pad_id=tok.pad_id)
  out = []
  for row, score, n in zip(np.asarray(seqs[0]), np.asarray(scores[0]), np.asarray(lengths[0])):
    row = [int(t) for t in row[:n]]
    out.append((tok.decode(row[:-1] if row and row[-1] in stops else row), float(score)))
  return out


def print_samples(workdir: str, a) -> None:
  """Prints the completions (or beams) of every prompt of `a` (configs/tools.py `sample()`)."""
  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only checkpoint is read only
  run = load(workdir, None if a.step < 0 else a.step)
  config, cfg, params, tok, mesh, step = run.config, run.model_cfg, run.params, run.tokenizer, run.mesh, run.step
  template = config.data.get("chat_template", "chatml")
  print(f"# {workdir} step {step} | {cfg.num_params() / 1e6:.2f}M params")
  for line in context_warnings(tok, a.prompts, a.chat, template, a.max_new_tokens, config.seq_len):
    print(line, file=sys.stderr)
  if a.beam:  # one prompt at a time: width rows need not divide over the mesh
    for p in a.prompts:
      for i, (text, score) in enumerate(beam_text(params, cfg, tok, p, a.chat, template, a.beam,
                                                  a.max_new_tokens)):
        print(f"--- {p!r} beam {i} (score {score:.3f})\n{text}")
    return
  with sharding.use_mesh(mesh):
    texts = decode.generate_text(params, cfg, tok, list(a.prompts), a.chat, key=jax.random.key(a.seed),
                                 max_new_tokens=a.max_new_tokens, num_samples=a.num,
                                 temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                 template=template, mesh=mesh)
  for p, samples in zip(a.prompts, texts):
    for i, text in enumerate(samples):
      print(f"--- {p!r} sample {i}\n{text}")


def main():
  """`python -m eval.sample --workdir DIR [--config.KEY=VALUE ...]`."""
  cli.run_on_workdir(print_samples, tools.sample(), "The run to sample from.")


if __name__ == "__main__":
  main()
