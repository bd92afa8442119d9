"""Generation: prefill + ONE jitted `lax.while_loop` of decode steps, beam search, text in and out.

Prompts are left-padded [batch, prompt_len] with a mask (1 = real token): pad slots get segment
id 0 (never attended) and positions count from each row's first real token. Prefill writes all
but the last prompt column into the KV cache; every loop step then feeds one token (first the
last prompt token, then the previous sample), samples the next one and stops when every row
has emitted a stop id or `max_new_tokens` are out. No host round trip per token.

Sampling (model/sampling.py) needs one uniform per row and step, so all of them are drawn before
the loop; prefill and steps are the Transformer's own decode path (model/transformer.py); the
cache grows in a few phases so early steps read a shorter cache.
"""
import functools
from typing import Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model import sharding
from model.sampling import Sampling, sample
from model.tokenizer import Tokenizer, apply_chat_template, stop_id
from model.transformer import ModelConfig, Transformer, init_cache

PHASES = 4  # decode loops per generate call; each one's KV cache is only as long as it needs

# ----------------------------------------------------------------------------- the model step


def transformer_apply(cfg: ModelConfig, params, tokens, positions, segment_ids, cache, head=True):
  """The default `apply_fn`: the Transformer against the cache -> (logits [b, t, V] or None, new cache)."""
  return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids,
                                cache=cache, head=head)


def _constrain_cache(cache, cfg: ModelConfig):
  """Batch-shard the cache over the data axes (a no-op outside `sharding.use_mesh`)."""
  lead = ("layers",) if cfg.scan_layers else ()
  kv = lambda x: sharding.constrain(x, lead + ("batch", "act_kv_heads", None, None))
  return dict(cache, layers=jax.tree.map(kv, cache["layers"]),
              segments=sharding.constrain(cache["segments"], ("batch", None)))


def _prefill(apply_fn, cfg, params, tokens, mask, cache_len):
  """Writes all but the last prompt column into a fresh cache. tokens/mask [b, P]."""
  b, p = tokens.shape
  cache = _constrain_cache(init_cache(cfg, b, cache_len), cfg)
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)                        # [b, P]
  if p > 1:
    _, cache = apply_fn(cfg, params, tokens[:, :-1], positions[:, :-1], mask[:, :-1], cache, head=False)
  return cache, positions[:, -1]


@flax.struct.dataclass
class Generation:
  """What `generate` returns (a pytree: jit / device_get friendly)."""
  tokens: jax.Array           # [b, N] int32, pad_id after the stop token
  logprobs: jax.Array         # [b, N] log p(token) under the model (temperature 1, unfiltered)
  sample_logprobs: jax.Array  # [b, N] log p(token) under the sampling distribution (0 greedy)
  mask: jax.Array             # [b, N] 1 up to and including the stop token
  lengths: jax.Array          # [b] number of generated tokens (stop token included)


def _phase_ends(n: int, phases: int) -> list[int]:
  """Step counts after which the cache grows: `phases` near-equal parts of n (>= 16 steps each)."""
  phases = max(1, min(phases, n // 16))
  return [round(n * (i + 1) / phases) for i in range(phases)]


def _grow_cache(cache, length: int, cfg: ModelConfig):
  """The cache padded with empty slots (segment 0) to `length` time slots."""
  t = 3 if cfg.scan_layers else 2
  grow = lambda x, axis: jnp.pad(x, [(0, length - x.shape[axis]) if a == axis else (0, 0)
                                     for a in range(x.ndim)])
  cache = dict(cache, layers=jax.tree.map(lambda x: grow(x, t), cache["layers"]),
               segments=grow(cache["segments"], 1))
  return _constrain_cache(cache, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "apply_fn", "max_new_tokens", "sampling", "pad_id",
                                             "phases"))
def _generate(params, tokens, mask, key, stop_ids, *, cfg, apply_fn, max_new_tokens, sampling, pad_id,
              phases):
  b, p = tokens.shape
  n = max_new_tokens
  ends = _phase_ends(n, phases)
  cache, last_pos = _prefill(apply_fn, cfg, params, tokens, mask, p - 1 + ends[0])
  ones = jnp.ones((b, 1), jnp.int32)
  uniforms = jax.random.uniform(key, (n, b))  # all draws up front: no RNG inside the loop

  def body(c):
    s = c["step"]
    logits, cache = apply_fn(cfg, params, c["token"][:, None], (last_pos + s)[:, None], ones, c["cache"])
    tok, lp, slp = sample(None, logits[:, -1], sampling, u=uniforms[s])      # [b] each
    live = ~c["done"]
    tok = jnp.where(live, tok, pad_id).astype(jnp.int32)
    put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, s))
    return dict(step=s + 1, token=tok, cache=cache,
                done=c["done"] | jnp.any(tok[:, None] == stop_ids[None, :], -1),
                tokens=put(c["tokens"], tok), logprobs=put(c["logprobs"], jnp.where(live, lp, 0.0)),
                sample_logprobs=put(c["sample_logprobs"], jnp.where(live, slp, 0.0)),
                mask=put(c["mask"], live))

  zeros = jnp.zeros((b, n), jnp.float32)
  c = dict(step=jnp.int32(0), token=tokens[:, -1].astype(jnp.int32), cache=cache,
           done=jnp.zeros((b,), bool), tokens=jnp.full((b, n), pad_id, jnp.int32),
           logprobs=zeros, sample_logprobs=zeros, mask=jnp.zeros((b, n), jnp.int32))
  for i, end in enumerate(ends):  # one loop per cache length: attention reads only that prefix
    if i:
      c["cache"] = _grow_cache(c["cache"], p - 1 + end, cfg)
    c = jax.lax.while_loop(lambda c, end=end: (c["step"] < end) & ~jnp.all(c["done"]), body, c)
  return Generation(tokens=c["tokens"], logprobs=c["logprobs"], sample_logprobs=c["sample_logprobs"],
                    mask=c["mask"], lengths=jnp.sum(c["mask"], -1))


def _stop_array(stop_ids) -> jax.Array:
  """Stop ids as int32 [multiple of 8], padded with -1 (never a token): one compile for 1..8 ids."""
  ids = [int(i) for i in np.asarray(stop_ids).reshape(-1)]
  pad = -len(ids) % 8 if ids else 8
  return jnp.asarray(ids + [-1] * pad, jnp.int32)


def generate(params, cfg: ModelConfig, tokens, mask=None, key=None, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), pad_id: int = 0,
             apply_fn: Optional[Callable] = None, phases: int = PHASES) -> Generation:
  """Samples continuations of left-padded prompts tokens/mask [b, P] (mask None = no padding).

  temperature 0 = greedy. `key` is a jax key (needed unless greedy). `apply_fn(cfg, params,
  tokens, positions, segment_ids, cache, head=True) -> (logits, cache)` replaces the model
  (tests drive the loop with stubs). The cache grows in `phases` steps (one compiled loop each) so
  early steps attend over a shorter cache. Under `sharding.use_mesh(mesh)` pass params sharded and
  tokens batch-sharded (`sharding.batch_sharding(mesh)`); the cache follows the batch."""
  if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0.0:
    raise ValueError(f"need 0 < top_p <= 1, top_k >= 0 and temperature >= 0; got top_p={top_p}, "
                     f"top_k={top_k}, temperature={temperature}")
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.ones_like(tokens) if mask is None else jnp.asarray(mask, jnp.int32)
  key = jax.random.key(0) if key is None else key
  return _generate(params, tokens, mask, key, _stop_array(stop_ids),
                   cfg=cfg, apply_fn=apply_fn or transformer_apply, max_new_tokens=int(max_new_tokens),
                   sampling=Sampling(float(temperature), int(top_k), float(top_p)), pad_id=int(pad_id),
                   phases=int(phases))


# ----------------------------------------------------------------------------- beam search


def beam_search(step_fn, state, first_tokens, *, width: int, max_new_tokens: int,
                stop_ids: Sequence[int] = (), length_penalty: float = 0.0, pad_id: int = 0):
  """Keeps the `width` partial sequences of highest cumulative log-prob (traceable, one while_loop).

  step_fn(state, parents [b*w], tokens [b*w]) -> (logprobs [b*w, V], state): first reorder the
  state so beam j continues beam parents[j] (flat index), then feed it tokens. `state` starts
  with w identical copies of each row; first_tokens [b] are the last prompt tokens.
  Finished beams keep their score and extend only with pad. Candidates and the final beams are
  ranked by sum(log p) / length ** length_penalty. Returns (tokens [b, w, N], scores [b, w],
  logprob sums [b, w], lengths [b, w]), best beam first."""
  b, w, n = first_tokens.shape[0], width, max_new_tokens
  stops = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
  norm = lambda score, length: score / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty

  def cond(c):
    return (c["step"] < n) & ~jnp.all(c["done"])

  def body(c):
    s = c["step"]
    logp, st = step_fn(c["state"], c["parents"], c["tokens"])              # [b*w, V]
    v = logp.shape[-1]
    logp = logp.reshape(b, w, v).astype(jnp.float32)
    only_pad = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)            # [V]
    logp = jnp.where(c["done"][:, :, None], only_pad, logp)
    cand = c["score"][:, :, None] + logp                                     # [b, w, V]
    length = c["length"] + (~c["done"]).astype(jnp.int32)                    # [b, w]
    _, idx = jax.lax.top_k(norm(cand, length[:, :, None]).reshape(b, w * v), w)  # [b, w]
    beam, tok = idx // v, (idx % v).astype(jnp.int32)
    take = lambda a: jnp.take_along_axis(a, beam, 1)
    done = take(c["done"])
    seqs = jnp.take_along_axis(c["seqs"], beam[:, :, None], 1).at[:, :, s].set(tok)
    return dict(step=s + 1, state=st, parents=(jnp.arange(b)[:, None] * w + beam).reshape(-1),
                tokens=tok.reshape(-1), seqs=seqs,
                score=jnp.take_along_axis(cand.reshape(b, w * v), idx, 1), length=take(length),
                done=done | jnp.any(tok[:, :, None] == stops, -1))

  score = jnp.tile(jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf), (b, 1))   # one live beam per row
  c = dict(step=jnp.int32(0), state=state, parents=jnp.arange(b * w, dtype=jnp.int32),
           tokens=jnp.repeat(jnp.asarray(first_tokens, jnp.int32), w), score=score,
           seqs=jnp.full((b, w, n), pad_id, jnp.int32), length=jnp.zeros((b, w), jnp.int32),
           done=jnp.zeros((b, w), bool))
  c = jax.lax.while_loop(cond, body, c)
  final = norm(c["score"], c["length"])
  order = jnp.argsort(-final, axis=-1)
  take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), 1)
  return take(c["seqs"]), take(final), take(c["score"]), take(c["length"])


@functools.partial(jax.jit, static_argnames=("cfg", "apply_fn", "width", "max_new_tokens",
                                             "length_penalty", "pad_id"))
def _beam_generate(params, tokens, mask, stop_ids, *, cfg, apply_fn, width, max_new_tokens,
                   length_penalty, pad_id):
  b, p = tokens.shape
  rep = lambda x: jnp.repeat(x, width, axis=0)
  cache, last_pos = _prefill(apply_fn, cfg, params, rep(tokens), rep(mask),
                             p + max_new_tokens - 1)
  batch_axis = 1 if cfg.scan_layers else 0

  def step_fn(st, parents, toks):
    cache, pos = st
    layers = jax.tree.map(lambda x: jnp.take(x, parents, axis=batch_axis), cache["layers"])
    cache = dict(cache, layers=layers, segments=jnp.take(cache["segments"], parents, axis=0))
    logits, cache = apply_fn(cfg, params, toks[:, None], pos[:, None], jnp.ones_like(toks)[:, None], cache)
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)), (cache, pos + 1)

  return beam_search(step_fn, (cache, last_pos), tokens[:, -1], width=width,
                     max_new_tokens=max_new_tokens, stop_ids=stop_ids, length_penalty=length_penalty,
                     pad_id=pad_id)


def beam_generate(params, cfg: ModelConfig, tokens, mask=None, *, width: int, max_new_tokens: int,
                  stop_ids: Sequence[int] = (), length_penalty: float = 0.0, pad_id: int = 0,
                  apply_fn: Optional[Callable] = None):
  """Beam search over the model from left-padded prompts [b, P]; see `beam_search` for outputs."""
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.ones_like(tokens) if mask is None else jnp.asarray(mask, jnp.int32)
  return _beam_generate(params, tokens, mask, _stop_array(stop_ids), cfg=cfg,
                        apply_fn=apply_fn or transformer_apply, width=int(width),
                        max_new_tokens=int(max_new_tokens), length_penalty=float(length_penalty),
                        pad_id=int(pad_id))


# ----------------------------------------------------------------------------- text in, text out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1, width_multiple: int = 1):
  """(tokens, mask) int32 numpy [len(seqs) rounded up to `multiple`, max len rounded up to
  `width_multiple`], padded on the left. Rounded widths let calls share one compiled program."""
  rows = -(-len(seqs) // multiple) * multiple
  width = -(-max(1, max(len(s) for s in seqs)) // width_multiple) * width_multiple
  tokens = np.full((rows, width), pad_id, np.int32)
  mask = np.zeros((rows, width), np.int32)
  for i, s in enumerate(seqs):
    if len(s):
      tokens[i, width - len(s):], mask[i, width - len(s):] = s, 1
  for i in range(len(seqs), rows):  # filler rows: one token, dropped afterwards
    tokens[i, -1], mask[i, -1] = pad_id, 1
  return tokens, mask


def generate_text(params, cfg: ModelConfig, tokenizer: Tokenizer, prompts: Sequence[str],
                  chat: bool = False, *, key=None, max_new_tokens: int = 64, num_samples: int = 1,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  template: str = "chatml", mesh=None) -> list[list[str]]:
  """Completions [prompt][sample] as text (stop token dropped). chat: apply the chat template with
  a generation prompt and stop at the end of the assistant turn; otherwise bos + text, stop at eos.
  With `mesh`, rows are padded to the data axes and sharded over them."""
  if chat:
    seqs = [apply_chat_template(tokenizer, [{"role": "user", "content": p}], template,
                                add_generation_prompt=True)[0] for p in prompts]
    stops = (stop_id(tokenizer, template), tokenizer.eos_id)
  else:
    seqs = [tokenizer.encode(p, add_bos=True) for p in prompts]
    stops = (tokenizer.eos_id,)
  seqs = [s for s in seqs for _ in range(num_samples)]
  multiple = 1 if mesh is None else sharding.data_axis_size(mesh)
  tokens, mask = left_pad(seqs, tokenizer.pad_id, multiple, width_multiple=16)
  if mesh is not None:
    tokens, mask = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, mask))
  out = generate(params, cfg, tokens, mask, key if key is not None else jax.random.key(0),
                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 stop_ids=stops, pad_id=tokenizer.pad_id)
  toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  texts = []
  for i in range(len(seqs)):
    ids = list(toks[i, :lengths[i]])
    if ids and ids[-1] in stops:
      ids = ids[:-1]
    texts.append(tokenizer.decode(ids))
  return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
