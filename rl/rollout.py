"""Sampling G completions per prompt with model/decode.py, and the forward pass that scores them.

Layout (prompt-major): prompts [N, P] left-padded, completions [R = N * G, T]; completion i of
prompt p is row p * G + i. A completion's mask is 1 up to and including its stop token; prompt
and pad positions are never part of any completion array, so no loss or KL can see them.

The prompt is shared by its G completions, so both sampling and scoring run it once:
- `sample` prefills the KV cache for the N distinct prompts and copies it G times;
- `forward` runs the prompt (all but its last token) once into a cache, copies it G times and
  runs the completion rows against it. Gradients flow through the shared prompt keys/values, so
  this equals the plain forward of [prompt; completion] rows at ~N*P + R*T tokens, not R*(P+T).
  Either way the LM head runs on completion positions only.
"""
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model import decode, sharding
from model.transformer import Transformer, init_cache

LENGTH_BUCKET = 16  # completion arrays are cut to a multiple of this (fewer compiled shapes)


@flax.struct.dataclass
class Rollout:
  prompt: jax.Array       # [N, P] int32, left-padded
  prompt_mask: jax.Array  # [N, P] int32, 1 on real prompt tokens
  tokens: jax.Array       # [R, T] int32 completions, pad after the stop token
  mask: jax.Array         # [R, T] int32, 1 on real completion tokens (stop token included)


def repeat_cache(cache, g: int, scan_layers: bool):
  """A KV cache of N rows -> N * G rows (row p * G + i is a copy of row p), batch-sharded."""
  if g == 1:
    return cache
  axis = 1 if scan_layers else 0
  lead = ("layers",) if scan_layers else ()
  kv = lambda x: sharding.constrain(jnp.repeat(x, g, axis=axis), lead + ("batch", "act_kv_heads", None, None))
  return dict(cache, layers=jax.tree.map(kv, cache["layers"]),
              segments=sharding.constrain(jnp.repeat(cache["segments"], g, axis=0), ("batch", None)))


@functools.lru_cache(maxsize=None)
def group_apply(g: int):
  """An `apply_fn` for decode.generate whose prefill runs each group's prompt once.

  decode prefills the prompt with one head=False call; here it runs on rows 0, G, 2G, ... and the
  cache is copied to the G rows of each group. Cached per G so jit sees the same function."""
  def apply_fn(cfg, params, tokens, positions, segment_ids, cache, head=True):
    if head or g == 1:
      return decode.transformer_apply(cfg, params, tokens, positions, segment_ids, cache, head)
    axis = 1 if cfg.scan_layers else 0
    every = lambda x, ax=0: jax.lax.slice_in_dim(x, 0, x.shape[ax], g, axis=ax)
    small = dict(cache, layers=jax.tree.map(lambda x: every(x, axis), cache["layers"]),
                 segments=every(cache["segments"]))
    _, small = decode.transformer_apply(cfg, params, every(tokens), every(positions),
                                        every(segment_ids), small, head=False)
    return None, repeat_cache(small, g, cfg.scan_layers)
  return apply_fn


def sample(params, cfg, prompt, prompt_mask, key, g: int, *, max_new_tokens: int, temperature: float,
           top_k: int, top_p: float, stop_ids, pad_id: int, mesh=None) -> decode.Generation:
  """G samples per prompt. prompt/prompt_mask [N, P] (host) -> Generation of [N * G, max_new_tokens]."""
  rows = lambda x: np.repeat(np.asarray(x, np.int32), g, axis=0)  # [R, P]
  tokens, mask = rows(prompt), rows(prompt_mask)
  if mesh is not None:
    tokens, mask = (put(x, mesh) for x in (tokens, mask))
  return decode.generate(params, cfg, tokens, mask, key, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                         pad_id=pad_id, apply_fn=group_apply(g))


def bucket(lengths, max_new_tokens: int) -> int:
  """Width that holds every completion: max length rounded up to LENGTH_BUCKET (<= max_new_tokens)."""
  longest = max(1, int(np.max(lengths)))
  return min(max_new_tokens, -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET)


def put(x, mesh, sharded: bool = True):
  """A host array (the same on every process) -> a global array, rows over the data axes or replicated."""
  x = np.asarray(x)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sh = sharding.batch_sharding(mesh, x.ndim) if sharded else replicated
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
  """A global array on every process's host."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def forward(params, cfg, prompt, prompt_mask, inputs, g: int, *, head: bool = True, hidden: bool = False):
  """The model on completion rows after their prompt: (logits [R, W, V] | None, hidden | None).

  prompt/prompt_mask [N, P]; inputs [R, W]: the tokens that follow the prompt (R = N * g). Output
  position w is the state after the prompt and inputs[:, :w], i.e. it predicts inputs[:, w]; the
  LM head runs on these W positions only. hidden is the final-norm output [R, W, d].
  g > 1: the prompt (all but its last token) runs once into a KV cache that its g rows share.
  g == 1: one plain pass over [prompt; inputs[:, :-1]] (faster than the cache path on CPU).
  """
  n, p = prompt.shape
  r, w = inputs.shape
  model = Transformer(cfg)
  if g == 1:
    tokens = jnp.concatenate([prompt, inputs[:, :-1]], axis=1)                  # [R, P + W - 1]
    seg = jnp.concatenate([prompt_mask, jnp.ones((r, w - 1), prompt_mask.dtype)], axis=1)
    pos = jnp.maximum(jnp.cumsum(seg, -1) - 1, 0)
    logits, h = model.apply({"params": params}, tokens, pos, seg, return_hidden=True, head=head,
                            logit_slots=slice(p - 1, None))                     # [R, W, V], [R, P + W - 1, d]
    return logits, (h[:, p - 1:] if hidden else None)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, -1) - 1, 0)                  # [N, P]
  cache = init_cache(cfg, n, p - 1 + w)
  _, cache = model.apply({"params": params}, prompt[:, :-1], positions[:, :-1], prompt_mask[:, :-1],
                         cache=cache, head=False)
  cache = repeat_cache(cache, g, cfg.scan_layers)
  last = jnp.repeat(prompt[:, -1:], g, axis=0)                                  # [R, 1]
  tokens = jnp.concatenate([last, inputs[:, :-1]], axis=1)                      # [R, W]
  pos = jnp.repeat(positions[:, -1:], g, axis=0) + jnp.arange(w)                # [R, W]
  seg = jnp.ones((r, w), jnp.int32)  # after the stop token: causal, so it never reaches a real one
  logits, h, _ = model.apply({"params": params}, tokens, pos, seg, cache=cache, head=head,
                             return_hidden=True)                                # [R, W, V], [R, W, d]
  return logits, (h if hidden else None)
