"""Generation: cached decoding vs full forward passes, stops, left padding, sampling filters
(worked examples of docs/algorithms.md + a float64 NumPy reference), beam search, sharding, text."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from model import decode, sampling, sharding
from model.transformer import ModelConfig, Transformer, init_cache

# ----------------------------------------------------------------------------- helpers


def random_params(cfg, seed=0):
  """Random weights (std 0.1) and norm scales / biases near 1 / 0, drawn by NumPy: no XLA compile."""
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)
  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return jnp.asarray(1.0 + 0.1 * noise if "scale" in str(path) else 0.1 * noise)
  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes)["params"])


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig.from_config(models.tiny())
  return cfg, Transformer(cfg), random_params(cfg)


def prompts(cfg, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(6, cfg.vocab_size, n)) for n in lengths]


def full_forward_greedy(model, params, seqs, steps):
  """Greedy by re-running the whole left-padded sequence at every step: (tokens, logprobs).

  The rows live in a [b, P + steps] buffer; slots after the current token hold pads, which the
  causal mask keeps out of the logits read at the current token, so one compile serves all steps."""
  toks, mask = decode.left_pad(seqs)
  b, p = toks.shape
  toks = np.concatenate([toks, np.zeros((b, steps), np.int32)], 1)
  mask = np.concatenate([mask, np.ones((b, steps), np.int32)], 1)
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  forward = jax.jit(lambda t: jax.nn.log_softmax(model.apply({"params": params}, t, pos, mask)))
  out_t, out_lp = [], []
  for s in range(steps):
    logp = np.asarray(forward(toks))[:, p - 1 + s]                      # [b, V]
    nxt = logp.argmax(-1)
    out_t.append(nxt)
    out_lp.append(logp[np.arange(b), nxt])
    toks[:, p + s] = nxt
  return np.stack(out_t, 1), np.stack(out_lp, 1)


def ref_filter(logits, temperature=1.0, top_k=0, top_p=1.0):
  """float64 sort-based reference of the sampling distribution (temperature -> top-k -> top-p)."""
  x = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-x, kind="stable")
  keep = np.zeros(x.shape, bool)
  keep[order[:top_k] if top_k else order] = True
  q = np.where(keep, np.exp(x - x.max()), 0.0)
  q /= q.sum()
  if top_p < 1.0:
    cum = np.cumsum(q[order])
    n = int(np.argmax(cum >= top_p)) + 1
    keep = np.zeros(x.shape, bool)
    keep[order[:n]] = True
    q = np.where(keep, q, 0.0) / q[keep].sum()
  return q


SAMPLED = dict(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95)  # one compile, three tests

# ----------------------------------------------------------------------------- the decode loop


def test_cached_greedy_equals_full_forward_argmax(tiny):
  cfg, model, params = tiny
  seqs = prompts(cfg, [5, 9, 1])
  toks, mask = decode.left_pad(seqs)
  out = decode.generate(params, cfg, toks, mask, max_new_tokens=40, temperature=0.0, phases=2)
  want_t, want_lp = full_forward_greedy(model, params, seqs, 40)  # the cache grew once
  np.testing.assert_array_equal(out.tokens, want_t)
  np.testing.assert_allclose(out.logprobs, want_lp, atol=1e-4)
  np.testing.assert_array_equal(out.mask, 1)
  np.testing.assert_array_equal(out.lengths, 40)
  assert np.all(np.asarray(out.sample_logprobs) == 0)  # greedy: deterministic choice
  again = decode.generate(params, cfg, toks, mask, max_new_tokens=40, temperature=0.0, phases=2)
  np.testing.assert_array_equal(again.tokens, out.tokens)


def test_left_padded_rows_equal_each_row_alone(tiny):
  cfg, _, params = tiny
  seqs = prompts(cfg, [3, 11], seed=1)
  toks, mask = decode.left_pad(seqs)
  batch = decode.generate(params, cfg, toks, mask, max_new_tokens=6, temperature=0.0)
  for i, s in enumerate(seqs):
    alone = decode.generate(params, cfg, np.array([s]), max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
    np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)


def test_sampling_is_reproducible_per_seed(tiny):
  cfg, _, params = tiny
  toks, mask = decode.left_pad(prompts(cfg, [4, 7]))
  run = lambda seed: decode.generate(params, cfg, toks, mask, jax.random.key(seed), **SAMPLED)
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  assert np.all(np.asarray(a.sample_logprobs) >= np.asarray(a.logprobs) - 1e-5)  # filtering only
  assert np.all(np.asarray(a.sample_logprobs) <= 0)                           # raises kept probs


def table_apply(cfg, params, tokens, positions, segment_ids, cache, head=True):
  """A stub model: next-token log-probs depend only on the current token (params['logp'][t])."""
  jax.debug.callback(lambda: CALLS.append(tokens.shape[1]) if head else None)
  return params["logp"][tokens], cache


CALLS = []


def test_stop_id_ends_one_row_while_the_other_continues(tiny):
  cfg = tiny[0]
  nxt = {2: 3, 3: 1, 4: 5, 5: 6, 6: 7, 7: 4, 1: 1}  # 1 is the stop id
  logp = np.full((cfg.vocab_size, cfg.vocab_size), -30.0, np.float32)
  for a, b in nxt.items():
    logp[a, b] = 0.0
  params = {"logp": jnp.asarray(logp)}
  CALLS.clear()
  out = decode.generate(params, cfg, np.array([[0, 2], [9, 4]]), np.array([[0, 1], [1, 1]]),
                        max_new_tokens=6, temperature=0.0, stop_ids=[1], apply_fn=table_apply)
  np.testing.assert_array_equal(out.tokens, [[3, 1, 0, 0, 0, 0], [5, 6, 7, 4, 5, 6]])
  np.testing.assert_array_equal(out.mask, [[1, 1, 0, 0, 0, 0], [1] * 6])
  np.testing.assert_array_equal(out.lengths, [2, 6])
  assert len(CALLS) == 6
  # when every row has stopped the loop ends early: 2 steps, not 10
  CALLS.clear()
  out = decode.generate(params, cfg, np.array([[2], [3]]), max_new_tokens=10, temperature=0.7,
                        stop_ids=[1], apply_fn=table_apply)
  np.testing.assert_array_equal(out.lengths, [2, 1])
  np.testing.assert_array_equal(out.tokens[:, :3], [[3, 1, 0], [1, 0, 0]])
  assert len(CALLS) == 2


def test_stop_on_a_real_model_row(tiny):
  cfg, _, params = tiny
  toks, mask = decode.left_pad(prompts(cfg, [4, 7]))
  run = lambda stops: decode.generate(params, cfg, toks, mask, jax.random.key(0), stop_ids=stops,
                                      **SAMPLED)
  free = run(())
  stop = int(free.tokens[0, 2])
  assert stop not in np.asarray(free.tokens[1]).tolist()
  out = run([stop])  # same uniforms per row and step: identical up to the stop
  first = list(np.asarray(free.tokens[0])).index(stop)
  assert int(out.lengths[0]) == first + 1 and int(out.lengths[1]) == 12
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  np.testing.assert_array_equal(out.tokens[0, first + 1:], 0)
  np.testing.assert_array_equal(out.mask[0], np.arange(12) <= first)
  np.testing.assert_array_equal(out.tokens[1], free.tokens[1])


# ----------------------------------------------------------------------------- sampling filters


def test_top_p_worked_example_keeps_only_lot():
  # "thanks a" -> lot 0.89, bunch 0.05, ton 0.03, million 0.02, few 0.01
  probs = jnp.array([0.05, 0.89, 0.03, 0.02, 0.01])
  np.testing.assert_array_equal(sampling.top_p_mask(probs, 0.88), [0, 1, 0, 0, 0])
  logits = sampling.filter_logits(jnp.log(probs), top_p=0.88)
  assert np.isfinite(np.asarray(logits)).tolist() == [False, True, False, False, False]
  assert sampling.top_p_mask(probs, 0.90).sum() == 2
  assert sampling.top_p_mask(jnp.full(4, 0.25), 0.5).all()  # tied probabilities are kept together
  with pytest.raises(ValueError, match="top_p"):
    decode.generate({}, None, np.ones((1, 2)), max_new_tokens=2, top_p=0.0)


@pytest.mark.parametrize("shape", ["peaked", "uniform", "two_levels", "random"])
def test_top_k_keeps_exactly_k(shape):
  v = 50
  logits = {"peaked": jnp.zeros(v).at[7].set(20.0), "uniform": jnp.zeros(v),
            "two_levels": jnp.where(jnp.arange(v) < 2, 1.0, 0.0),
            "random": jax.random.normal(jax.random.key(0), (v,))}[shape]
  batch = jnp.broadcast_to(logits, (2, 3, v))
  for k in (1, 3, 10):
    mask = sampling.top_k_mask(batch, k)
    np.testing.assert_array_equal(mask.sum(-1), k)
    kept = np.asarray(logits)[np.asarray(mask[0, 0])]
    assert kept.min() >= np.sort(np.asarray(logits))[-k]  # they are k of the largest
  assert np.isfinite(np.asarray(sampling.filter_logits(logits, top_k=3))).sum() == 3


def test_sort_free_top_p_equals_sorted_reference():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((64, 300)) * rng.uniform(0.2, 5.0, (64, 1))
  for p in (0.1, 0.5, 0.9, 0.99):
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)
    got = np.asarray(sampling.top_p_mask(probs, p))
    want = np.stack([ref_filter(row, top_p=p) > 0 for row in logits])
    assert (got != want).sum() == 0, p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.8), (1.3, 0, 0.9),
                                                     (1.0, 3, 1.0)])
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
  probs = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005])
  logits = jnp.asarray(np.log(probs)[::-1].copy(), jnp.float32)   # best token last: order matters
  want = ref_filter(logits, temperature, top_k, top_p)
  n = 4000
  tok, lp, slp = sampling.sample(jax.random.key(42), jnp.broadcast_to(logits, (n, 10)),
                               sampling.Sampling(temperature, top_k, top_p))
  counts = np.bincount(np.asarray(tok), minlength=10)
  assert counts[want == 0].sum() == 0
  kept = want > 0
  chi2 = (((counts - n * want) ** 2)[kept] / (n * want[kept])).sum()
  assert chi2 < 30.0, (chi2, counts, n * want)   # df <= 9: p ~ 4e-4
  np.testing.assert_allclose(lp, np.log(probs[::-1])[np.asarray(tok)], atol=1e-5)
  np.testing.assert_allclose(slp, np.log(want[np.asarray(tok)]), atol=1e-5)


def test_inverse_cdf_never_picks_a_zero_weight_token():
  w = jnp.zeros((5, 130)).at[:, 3].set(1.0).at[:, 129].set(2.0)
  u = jnp.array([0.0, 0.3, 0.34, 0.9, 0.99999994])
  np.testing.assert_array_equal(sampling.inverse_cdf(w, u), [3, 3, 129, 129, 129])


# ----------------------------------------------------------------------------- beam search

WORDS = ["<pad>", "<eos>", "how", "come", "are", "do", "you", "animals", "the", "a"]
W = {w: i for i, w in enumerate(WORDS)}


def toy_table():
  """P(next | current word) of the docs/algorithms.md example; leftover mass spread thinly."""
  rows = {"how": {"come": 0.24, "are": 0.31, "do": 0.26},
          "come": {"animals": 0.36}, "are": {"you": 0.91}, "do": {"you": 0.63},
          "you": {"<eos>": 1.0}, "animals": {"<eos>": 1.0}}
  table = np.zeros((len(WORDS), len(WORDS)))
  for a in WORDS:
    row = rows.get(a, {})
    rest = [w for w in WORDS[1:] if w not in row]
    for w in rest:
      table[W[a], W[w]] = (1.0 - sum(row.values())) / len(rest)
    for w, p in row.items():
      table[W[a], W[w]] = p
  return table


def test_beam_search_worked_example():
  logp = jnp.asarray(np.log(np.maximum(toy_table(), 1e-30)), jnp.float32)
  step = lambda state, parents, tokens: (logp[tokens], state)
  seqs, scores, raw, lengths = decode.beam_search(step, None, jnp.array([W["how"]]), width=3,
                                                  max_new_tokens=4, stop_ids=[W["<eos>"]])
  words = [" ".join(WORDS[t] for t in row if t > 1) for row in np.asarray(seqs[0])]
  assert words == ["are you", "do you", "come animals"]
  np.testing.assert_allclose(np.exp(raw[0]), [0.2821, 0.1638, 0.0864], rtol=1e-5)
  np.testing.assert_array_equal(lengths[0], [3, 3, 3])  # two words + eos
  np.testing.assert_allclose(scores, raw)                # no length penalty
  # a length penalty divides by length ** alpha (all lengths equal here: same order)
  _, pen, _, _ = decode.beam_search(step, None, jnp.array([W["how"]]), width=3, max_new_tokens=4,
                                    stop_ids=[W["<eos>"]], length_penalty=1.0)
  np.testing.assert_allclose(pen[0], np.log([0.2821, 0.1638, 0.0864]) / 3, rtol=1e-5)


def test_greedy_on_the_toy_table_picks_are_first(tiny):
  cfg = tiny[0]
  table = np.full((cfg.vocab_size, cfg.vocab_size), 1e-30)
  table[:len(WORDS), :len(WORDS)] = np.maximum(toy_table(), 1e-30)
  out = decode.generate({"logp": jnp.asarray(np.log(table), jnp.float32)}, cfg, np.array([[W["how"]]]),
                        max_new_tokens=5, temperature=0.0, stop_ids=[W["<eos>"]], apply_fn=table_apply)
  assert [WORDS[t] for t in np.asarray(out.tokens[0, :3])] == ["are", "you", "<eos>"]
  np.testing.assert_allclose(np.exp(out.logprobs[0, :2]), [0.31, 0.91], rtol=1e-5)


def test_beam_search_on_the_model_scores_its_beams(tiny):
  cfg, model, params = tiny
  seqs = prompts(cfg, [4, 7], seed=5)
  toks, mask = decode.left_pad(seqs)
  want_t, want_lp = full_forward_greedy(model, params, seqs, 5)
  one, _, raw1, _ = decode.beam_generate(params, cfg, toks, mask, width=1, max_new_tokens=5)
  np.testing.assert_array_equal(one[:, 0], want_t)                 # width 1 is greedy
  np.testing.assert_allclose(raw1[:, 0], want_lp.sum(-1), atol=1e-4)
  beams, _, raw, _ = decode.beam_generate(params, cfg, toks, mask, width=3, max_new_tokens=5)
  assert np.all(np.diff(np.asarray(raw), axis=-1) <= 1e-6)       # best first
  assert np.all(np.asarray(raw[:, 0]) >= want_lp.sum(-1) - 1e-4)  # here beam search beats greedy
  forward = jax.jit(lambda t: jax.nn.log_softmax(model.apply({"params": params}, t)))
  for i, s in enumerate(seqs):  # each beam's score is its log-prob under a full forward pass
    full = np.concatenate([np.broadcast_to(np.array(s), (3, len(s))), np.asarray(beams[i])], 1)
    logp = np.asarray(forward(full))[:, len(s) - 1:-1]               # [3, 5, V]
    want = np.take_along_axis(logp, np.asarray(beams[i])[:, :, None], -1).sum((1, 2))
    np.testing.assert_allclose(raw[i], want, atol=1e-4)


# ----------------------------------------------------------------------------- mesh and text


@pytest.mark.eight_devices
def test_sharded_generation_matches_single_device(tiny):
  cfg, model, params = tiny
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=4))  # the 8 test devices
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  sharded = jax.device_put(params, sharding.tree_shardings(boxed, mesh))
  toks, mask = decode.left_pad(prompts(cfg, [4, 7]))
  want = decode.generate(params, cfg, toks, mask, jax.random.key(0), **SAMPLED)
  with sharding.use_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    got = decode.generate(sharded, cfg, put(toks), put(mask), jax.random.key(0), **SAMPLED)
  assert len(got.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_generate_text_plain_and_chat(tiny, tmp_path):
  from model import tokenizer as T
  from train import corpus
  cfg, _, params = tiny
  tok = T.train_tokenizer(corpus.pretrain_documents(0, 300), cfg.vocab_size, str(tmp_path / "t.model"))
  questions = ["What is 2 + 2?", "Hi"]
  texts = decode.generate_text(params, cfg, tok, questions, chat=True, max_new_tokens=6,
                               num_samples=2, temperature=0.0)
  assert len(texts) == 2 and all(len(t) == 2 and t[0] == t[1] for t in texts)  # greedy samples agree
  seqs = [T.apply_chat_template(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
          for q in questions for _ in range(2)]
  toks, mask = decode.left_pad(seqs)
  stops = [tok.im_end_id, tok.eos_id]
  out = decode.generate(params, cfg, toks, mask, max_new_tokens=6, temperature=0.0, stop_ids=stops)
  for i in range(2):
    ids = [t for t in np.asarray(out.tokens[2 * i, :out.lengths[2 * i]]) if t not in stops]
    assert texts[i][0] == tok.decode(ids)
  plain = decode.generate_text(params, cfg, tok, ["2 + 2 ="], max_new_tokens=4, key=jax.random.key(1))
  assert isinstance(plain[0][0], str)


def test_one_token_step_equals_the_full_forward_and_the_prefill():
  """The Transformer's one-token decode path (t == 1) against the full forward and against writing
  the same token in a prefill: GQA with a single kv head, qkv bias and tied embeddings (the
  default shape runs in every generate test above, against full forward passes)."""
  cfg = ModelConfig.from_config(dict(models.tiny(), n_kv_heads=1, qkv_bias=True, tie_embeddings=True))
  model = Transformer(cfg)
  toks, mask = decode.left_pad(prompts(cfg, [5, 2, 7], seed=9))
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)

  @jax.jit
  def three(params):
    run = lambda a, b, cache: model.apply({"params": params}, toks[:, a:b], pos[:, a:b], mask[:, a:b], cache=cache)
    p = toks.shape[1]
    _, cache = run(0, p - 1, init_cache(cfg, 3, 10))
    return run(p - 1, p, cache), run(0, p, init_cache(cfg, 3, 10)), run(0, p, None)

  (got, got_cache), (_, prefill_cache), full = three(random_params(cfg, seed=1))
  np.testing.assert_allclose(got[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got_cache["segments"], prefill_cache["segments"])
  assert int(got_cache["index"]) == int(prefill_cache["index"]) == toks.shape[1]
  real = np.asarray(prefill_cache["segments"] != 0)[:, None, :, None]  # [b, 1, T, 1]: padding is never read
  for a, b in zip(jax.tree.leaves(got_cache["layers"]), jax.tree.leaves(prefill_cache["layers"])):
    np.testing.assert_allclose(np.where(real, a, 0), np.where(real, b, 0), atol=1e-5)


def test_scanned_layers_decode_like_unrolled_ones(tiny):
  cfg, _, params = tiny
  scfg = ModelConfig.from_config(dict(models.tiny(), scan_layers=True))
  stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
  stacked["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs),
                                             *[params[f"layer_{i}"] for i in range(cfg.n_layers)])}
  toks, mask = decode.left_pad(prompts(cfg, [5, 9, 1], seed=4))
  want = decode.generate(params, cfg, toks, mask, jax.random.key(3), **SAMPLED)
  got = decode.generate(stacked, scfg, toks, mask, jax.random.key(3), **SAMPLED)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  _, _, want_raw, _ = decode.beam_generate(params, cfg, toks, mask, width=2, max_new_tokens=4)
  _, _, got_raw, _ = decode.beam_generate(stacked, scfg, toks, mask, width=2, max_new_tokens=4)
  np.testing.assert_allclose(got_raw, want_raw, atol=1e-4)
