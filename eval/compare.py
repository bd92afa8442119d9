"""A policy measured against other models: reward-model scores, win rate, KL to a reference.

- `reward_scores`: the reward model's score of each (question, completion) in the chat format it
  was trained on (prompt, then the completion and the template's end token; score at that token).
- `win_rate`: share of prompts where the policy's completion outscores the reference's (ties 1/2).
- `kl_to_reference`: KL(pi || pi_ref) per completion, estimated on completions sampled from the
  policy at temperature 1 as the mean over completions of sum_t k3 (unbiased, >= 0; rl/kl.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from model import sharding
from model.decode import left_pad
from model.tokenizer import stop_id
from rl import kl, prompts, rollout, steps
from train.dpo_loss import token_logps
from train import pairs


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  """Rows repeated from row 0 up to a multiple of `multiple` (the data axes)."""
  extra = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[:1], extra, axis=0)]) if extra else x


def chat_batch(tok, questions, completions, template: str, multiple: int = 1) -> dict:
  """prompt, prompt_mask [N', P] (left-padded); tokens, mask [N', T] (completion + end token,
  right-padded); N' = N rounded up to `multiple` with copies of row 0."""
  enc = [pairs.encode(tok, [{"role": "user", "content": q}], c, template)
         for q, c in zip(questions, completions, strict=True)]
  prompt, prompt_mask = left_pad([ids[:n] for ids, n in enc], tok.pad_id)       # [N, P]
  width = max(len(ids) - n for ids, n in enc)
  tokens = np.full((len(enc), width), tok.pad_id, np.int32)                    # [N, T]
  for i, (ids, n) in enumerate(enc):
    tokens[i, :len(ids) - n] = ids[n:]
  mask = (np.arange(width)[None] < np.array([len(ids) - n for ids, n in enc])[:, None]).astype(np.int32)
  return {k: _pad_rows(v, multiple) for k, v in
          dict(prompt=prompt, prompt_mask=prompt_mask, tokens=tokens, mask=mask).items()}


@functools.partial(jax.jit, static_argnums=(1,))
def _rm_scores(params, cfg, batch):
  return steps.reward_model_scores(params, cfg, batch, 1)                      # [N]


def reward_scores(rm_params, rm_cfg, tok, questions, completions, template: str, mesh) -> np.ndarray:
  """The reward model's score of each completion [N]."""
  batch = chat_batch(tok, questions, completions, template, sharding.data_axis_size(mesh))
  with sharding.use_mesh(mesh):
    out = _rm_scores(rm_params, rm_cfg, {k: rollout.put(v, mesh) for k, v in batch.items()})
  return rollout.to_host(out)[:len(questions)]


def win_rate(scores, ref_scores) -> float:
  """mean(1 if score > ref score, 1/2 if equal, else 0) over prompts."""
  s, r = np.asarray(scores), np.asarray(ref_scores)
  return float(np.mean((s > r) + 0.5 * (s == r)))


@functools.partial(jax.jit, static_argnums=(2,))
def _seq_kl(params, ref_params, cfg, batch):
  """sum_t k3(log pi, log pi_ref) over each completion's tokens [R]."""
  mask = batch["mask"].astype(jnp.float32)
  logp = lambda p: token_logps(rollout.forward(p, cfg, batch["prompt"], batch["prompt_mask"],
                                               batch["tokens"], 1)[0], batch["tokens"])  # [R, T]
  return jnp.sum(kl.k3(logp(params), logp(ref_params)) * mask, -1)


def kl_to_reference(params, ref_params, cfg, tok, problems, template: str, mesh, *, key,
                    max_new_tokens: int, max_prompt_len: int = 64) -> float:
  """Mean KL(pi || pi_ref) per completion, on one completion per problem sampled at temperature 1."""
  ptoks, pmask = prompts.encode(tok, [prompts.from_problem(p) for p in problems], template,
                                max_prompt_len)                               # [N, P]
  ways = sharding.data_axis_size(mesh)
  ptoks, pmask = _pad_rows(ptoks, ways), _pad_rows(pmask, ways)
  with sharding.use_mesh(mesh):
    gen = rollout.sample(params, cfg, ptoks, pmask, key, 1, max_new_tokens=max_new_tokens,
                         temperature=1.0, top_k=0, top_p=1.0,
                         stop_ids=(stop_id(tok, template), tok.eos_id), pad_id=tok.pad_id, mesh=mesh)
    batch = {"prompt": rollout.put(ptoks, mesh), "prompt_mask": rollout.put(pmask, mesh),
             "tokens": gen.tokens, "mask": gen.mask}
    out = rollout.to_host(_seq_kl(params, ref_params, cfg, batch))[:len(problems)]
  return float(np.mean(out))
