"""Packed preference pairs (config.data.pair_rows, train/pairs.py plan / packed_batch): the plan
places every pair once within its rows' budgets; a packed row scores each pair as its own plain
sequences (log-probs, rewards, DPO and reward-model losses against float64 formulas) and as the
unpacked batch does; branch masks keep packed pairs on the einsum path, model.attention=auto
included. The packed stream and cached pipeline: tests/test_stream_pairs.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpo_tiny
from configs.errors import UserError
from model import attention, heads, sharding
from model.transformer import ModelConfig, Transformer
from train import objectives, pairs


def random_pairs(rng, n, vocab):
  """n (prompt, chosen, rejected) id lists of widely varying lengths."""
  ids = lambda lo, hi: rng.integers(1, vocab, rng.integers(lo, hi)).tolist()
  return [(ids(1, 30), ids(1, 24), ids(1, 24)) for _ in range(n)]


def test_plan_places_every_pair_once_within_the_rows():
  rng = np.random.default_rng(0)
  sizes = rng.integers(3, 120, 300).tolist()
  pack = pairs.Packing(pairs=16, rows=9, row_len=128, per_row=4)
  batches = pairs.plan(sizes, pack)
  placed = [i for b in batches for g in b for i in g]
  assert sorted(placed) == list(range(300))
  for b in batches:
    assert len(b) == 9 and sum(map(len, b)) <= 16
    assert all(sum(sizes[i] for i in g) <= 128 and len(g) <= 4 for g in b)
  # best fit wastes little (one pair a row of 2 x 120: 25% tokens) and steps stay near 16 pairs
  assert sum(sizes) / (len(batches) * 9 * 128) > 0.8 and len(batches) <= 21
  # the first batch is the first 16 pairs less those that wait for the second
  first = set(i for g in batches[0] for i in g)
  assert first <= set(range(16)) and set(range(16)) - first <= set(i for g in batches[1] for i in g)


def test_packed_pairs_score_as_their_own_sequences_and_as_unpacked():
  """Random lengths, random tiny model (fp32): every pair of a packed batch gets the log-probs and
  rewards of prompt + chosen and prompt + rejected run alone through the plain model; the DPO and
  reward-model losses are the float64 formulas of those, and the unpacked batch's."""
  cfg = ModelConfig.from_config(dpo_tiny.get_config().model)
  model = Transformer(cfg)
  init = lambda k: sharding.unbox(model.init(jax.random.key(k), jnp.zeros((1, 8), jnp.int32))["params"])
  policy, ref = init(1), init(2)
  policy["reward_head"] = heads.init_scalar_head(cfg.d_model, jax.random.key(3))
  rng = np.random.default_rng(1)
  triples = random_pairs(rng, 10, cfg.vocab_size)
  ps = pairs.pair_set(triples, 0)
  pack = pairs.Packing(pairs=10, rows=3, row_len=160, per_row=7)
  (groups,) = pairs.plan(pairs.sizes_of(ps).tolist(), pack)[:1]
  packed = pairs.packed_batch(ps, groups, pack.per_row, pack.row_len, pack.row_len)
  slot_of = {j: i * pack.per_row + g for i, group in enumerate(groups) for g, j in enumerate(group)}
  assert sorted(slot_of) == list(range(10)) and max(map(len, groups)) >= 3  # every pair, several a row
  unpacked = pairs.make_batch(ps, np.arange(10))

  def scores(batch):
    batch = jax.tree.map(jnp.asarray, batch)
    logps = jax.jit(lambda p: objectives.pair_logps(p, batch, model))
    (pol, n), (rl, _) = logps(policy), logps(ref)
    rewards = jax.jit(objectives.pair_rewards, static_argnums=2)(policy, batch, model)
    with_logp = jax.jit(objectives.pair_rewards, static_argnums=(2, 3))(policy, batch, model, 0.7)
    return {"pol": np.asarray(pol), "ref": np.asarray(rl), "n": np.asarray(n), "rewards": np.asarray(rewards),
            "with_logp": np.asarray(with_logp)}

  got, flat = scores(packed), scores(unpacked)
  order = [slot_of[j] for j in range(10)]
  got = {k: v[order] for k, v in got.items()}  # pair j's slot -> row j

  # The reference: each prompt + completion alone, right-padded, through the plain model.
  seqs = [p + c for p, *cs in triples for c in cs]   # pair j: rows 2j (chosen), 2j + 1 (rejected)
  T = max(map(len, seqs))
  tokens = np.array([s + [0] * (T - len(s)) for s in seqs])
  segments = (np.arange(T) < np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
  want = {}
  for k, params in (("pol", policy), ("ref", ref)):
    logits, hidden = model.apply({"params": params}, tokens, None, segments, return_hidden=True)
    logits = np.asarray(logits, np.float64)  # [2N, T, V]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    want[k] = np.array([[sum(logp[2 * j + s, t - 1, seqs[2 * j + s][t]]
                             for t in range(len(triples[j][0]), len(seqs[2 * j + s]))) for s in (0, 1)]
                        for j in range(10)])
    if k == "pol":
      last = np.stack([np.asarray(hidden)[i, len(s) - 1] for i, s in enumerate(seqs)]).reshape(10, 2, -1)
      want["rewards"] = np.asarray(heads.scalar_head(policy["reward_head"], jnp.asarray(last)))
  want["n"] = np.array([[len(c), len(r)] for _, c, r in triples])
  want["with_logp"] = want["rewards"] + 0.7 * want["pol"] / want["n"]  # + weight x mean token log-prob
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-4, err_msg=k)
    np.testing.assert_allclose(got[k], flat[k], rtol=2e-5, atol=2e-4, err_msg=k)

  # Losses of the packed batch (its empty slots weigh 0) against the float64 formulas.
  config = dpo_tiny.get_config()
  config.reward.margin = 0.5
  ctx = objectives.Context(config, ref)
  batch = jax.tree.map(jnp.asarray, packed)
  num, den, _ = jax.jit(lambda p: objectives.dpo_loss(p, batch, model, ctx))(policy)
  delta = (want["pol"][:, 0] - want["ref"][:, 0]) - (want["pol"][:, 1] - want["ref"][:, 1])
  dpo = np.mean(np.log1p(np.exp(-config.dpo.beta * delta)))
  assert float(den) == 10
  np.testing.assert_allclose(float(num) / float(den), dpo, rtol=1e-5)
  # the reference log-probs precomputed (a ref_logps column: each pair's lands in its slot)
  with_ref = pairs.packed_batch(ps.with_columns(ref_logps=want["ref"].astype(np.float32)), groups, pack.per_row,
                                pack.row_len, pack.row_len)
  assert with_ref["ref_logps"].shape == (3, 7, 2)
  num, den, _ = jax.jit(lambda p, b: objectives.dpo_loss(p, b, model, objectives.Context(config, None)))(
      policy, jax.tree.map(jnp.asarray, with_ref))
  np.testing.assert_allclose(float(num) / float(den), dpo, rtol=1e-5)
  num, den, _ = jax.jit(lambda p: objectives.reward_loss(p, batch, model, ctx))(policy)
  bt = np.mean(np.log1p(np.exp(-(want["rewards"][:, 0] - want["rewards"][:, 1] - 0.5))))
  np.testing.assert_allclose(float(num) / float(den), bt, rtol=1e-5)


def test_branch_masks_keep_packed_pairs_on_the_einsum_path(monkeypatch):
  """On a TPU, model.attention=auto (and splash by name) run rows with segment ids alone in the
  splash kernel (its mask: the segment ids) but rows with branch ids in the einsum path (a dense mask)."""
  monkeypatch.setattr(sharding, "mesh_platform", lambda: "tpu")
  segments = jnp.ones((2, 256), jnp.int32)
  branches = jnp.zeros((2, 256), jnp.int32).at[:, 100:].set(1)
  for name in ("auto", "splash"):
    cfg = dataclasses.replace(ModelConfig.from_config(dpo_tiny.get_config().model), attention=name)
    assert attention.training_mask(cfg, segments).shape == (2, 256)   # splash: the segment ids
    assert attention.training_mask(cfg, segments, branches).shape == (2, 1, 1, 256, 256)
    assert attention.attention_impl(name, jnp.float32, 64, "tpu", 256, segments_only=False) == "xla"


def test_pair_rows_are_checked():
  config = dpo_tiny.get_config()
  config.data.pair_rows = 3
  with pytest.raises(UserError, match="pair_rows=3 must split"):
    pairs.check_packing(config, 2, 1)
  config.data.pair_rows = 32
  with pytest.raises(UserError, match="more rows than"):
    pairs.check_packing(config, 1, 1)
  config.objective, config.data.pair_rows = "sft", 4
  with pytest.raises(UserError, match="packs preference pairs"):
    pairs.check_packing(config, 1, 1)
