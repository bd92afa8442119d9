"""Reward model and DPO through the real trainer on the tiny config: DPO starts at log 2 with zero
rewards, one step raises the chosen-minus-rejected log-ratio, every dpo.loss trains, precomputed
reference log-probs match on-the-fly ones, LoRA uses its frozen base as the reference (no copy),
and a reward model learns the built-in preferences."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpo_tiny, pretrain_tiny, reward_tiny, sft_tiny
from eval import compare, preference
from model import heads, sharding
from model.transformer import ModelConfig, Transformer
from rl.models import load_reward_model
from train import data, dpo_loss, loop, objectives, optim, pairs, run_tokenizer, rundir
from train.params import abstract_params

LOG2 = math.log(2.0)


def configure(c, data_cache, **overrides):
  """Small, fast settings on the shared test data cache; `a.b=v` style overrides."""
  c.data.cache_dir = data_cache
  c.data.num_documents = 400          # 400 train pairs, 8 held-out
  c.batch_size, c.steps, c.seq_len = 8, 2, 128
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 1, 0, 1000, 0
  c.async_checkpoints = False
  c.optim.warmup_steps = 0
  c.update_from_flattened_dict(overrides)  # 'a.b' keys
  return c


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_cache):
  """(A 2-step pretraining checkpoint: the policy's start and the DPO reference, tokenizer path)."""
  workdir = str(tmp_path_factory.mktemp("base"))
  c = configure(pretrain_tiny.get_config(), data_cache, seq_len=64, **{"data.num_documents": 4000})
  loop.train(c, workdir)
  return workdir, data.load_or_train_tokenizer(c).path


@pytest.fixture
def make(base_run, data_cache):
  """make(config module, **overrides): a small config starting from (and referring to) base_run."""
  workdir, tok_path = base_run   # a fixed tokenizer path skips re-hashing the built-in corpus
  return lambda module, **kw: configure(module.get_config(), data_cache,
                                        **{"init_from": workdir, "tokenizer.path": tok_path, **kw})


def test_dpo_starts_at_log2_with_zero_rewards(make, tmp_path):
  # policy == reference after the step: an lr (> 0, as validation wants) far below the params' fp32 ulp
  c = make(dpo_tiny, steps=1, **{"optim.lr": 1e-30, "optim.schedule": "constant"})
  out = loop.train(c, str(tmp_path / "dpo"))
  assert out["train/pairs"] == 8
  for split in ("train", "eval"):
    assert abs(out[f"{split}/loss"] - LOG2) < 1e-6
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "kl"):
      assert out[f"{split}/{k}"] == 0.0, k
    assert out[f"{split}/logps/chosen"] < 0 and out[f"{split}/logps/rejected"] < 0


def _policy_and_batch(make, **overrides):
  """(config, mesh, model, base params, first train batch) for step-level checks."""
  c = make(dpo_tiny, **overrides)
  mesh = sharding.make_mesh(c.mesh)
  model = Transformer(ModelConfig.from_config(c.model))
  with sharding.use_mesh(mesh):
    abs_p, p_sh, _, _ = abstract_params(model, c.seq_len, mesh)
    params, _ = rundir.restore_params(c.init_from, abs_p, p_sh)
    batch = sharding.put_batch(next(pairs.make_batches(c, data.load_or_train_tokenizer(c), "train")), mesh)
  return c, mesh, model, params, batch


def test_one_sigmoid_step_raises_the_chosen_minus_rejected_log_ratio(make):
  c, mesh, model, ref, batch = _policy_and_batch(make, **{"optim.lr": 1e-3})
  with sharding.use_mesh(mesh):
    tx, lr = optim.make_optimizer(c.optim, c.steps)
    step = jax.jit(loop.make_train_step(model, objectives.get("dpo"), tx, lr, 1, None, c))
    params, _, m = step(ref, tx.init(ref), batch, jnp.int32(0), None, ref)

    def ratio(p):   # h_w - h_l per pair
      pol, ref_l = objectives.pair_logps(p, batch, model)[0], objectives.pair_logps(ref, batch, model)[0]
      return np.asarray((pol[:, 0] - ref_l[:, 0]) - (pol[:, 1] - ref_l[:, 1]))
    before, after = ratio(ref), ratio(params)
  assert abs(float(m["train/loss"]) - LOG2) < 1e-6 and np.all(before == 0)
  print("h_w - h_l after one step:", after)
  assert after.mean() > 0 and (after > 0).mean() >= 0.75


def test_dpo_gradient_accumulation_is_exact(make):
  c, mesh, model, ref, batch = _policy_and_batch(make, **{"dpo.loss": "ipo"})
  with sharding.use_mesh(mesh):
    policy = jax.tree.map(lambda x: x * 1.01, ref)   # off the reference: non-trivial losses
    tx, lr = optim.make_optimizer(c.optim, c.steps)
    outs = [jax.jit(loop.make_train_step(model, objectives.get("dpo"), tx, lr, k, None, c))(
        policy, tx.init(policy), batch, jnp.int32(0), None, ref) for k in (1, 2)]
  (p1, _, m1), (p2, _, m2) = outs
  for k in ("train/loss", "train/rewards/margin", "train/kl", "train/pairs", "train/grad_norm"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):   # Adam's first step ~ lr * sign(g):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)     # a ~0 gradient may flip; lr = 1e-4


def test_shared_prompt_row_scores_each_completion_as_its_own_sequence():
  """One row [prompt | chosen | rejected] per pair (random unequal lengths, right padding, a padding
  pair) gives the log-probs, lengths and rewards (the head alone, and + logp_weight x the mean token
  log-prob) of running prompt + chosen and prompt + rejected separately through the plain model, and
  the DPO loss of the float64 formula on those."""
  cfg = ModelConfig.from_config(dpo_tiny.get_config().model)
  model = Transformer(cfg)
  init = lambda k: sharding.unbox(model.init(jax.random.key(k), jnp.zeros((1, 8), jnp.int32))["params"])
  policy, ref = init(1), init(2)
  policy["reward_head"] = heads.init_scalar_head(cfg.d_model, jax.random.key(3))
  rng = np.random.default_rng(0)
  ids = lambda lo, hi: rng.integers(1, cfg.vocab_size, rng.integers(lo, hi)).tolist()
  triples = [(ids(1, 20), ids(1, 12), ids(1, 12)) for _ in range(5)]
  rows = np.array([3, -1, 0, 4, 1, 2])
  batch = jax.tree.map(jnp.asarray, pairs.make_batch(pairs.pair_set(triples, 0), rows))
  logps = jax.jit(lambda p: objectives.pair_logps(p, batch, model))
  got = {k: np.asarray(logps(p)[0]) for k, p in (("pol", policy), ("ref", ref))}
  n = np.asarray(logps(policy)[1])
  rewards = np.asarray(jax.jit(objectives.pair_rewards, static_argnums=2)(policy, batch, model))
  with_logp = np.asarray(jax.jit(objectives.pair_rewards, static_argnums=(2, 3))(policy, batch, model, 0.7))

  # The reference: every prompt + completion as its own right-padded row of the plain model.
  seqs = [(i, j, prompt, completion) for i, r in enumerate(rows) if r >= 0
          for prompt, *completions in [triples[r]] for j, completion in enumerate(completions)]
  T = max(len(p) + len(c) for _, _, p, c in seqs)
  tokens = np.array([p + c + [0] * (T - len(p) - len(c)) for _, _, p, c in seqs])  # [n, T]
  segments = np.array([[int(t < len(p) + len(c)) for t in range(T)] for _, _, p, c in seqs])
  apply = jax.jit(lambda p: model.apply({"params": p}, tokens, None, segments, return_hidden=True))
  want = {k: np.zeros((len(rows), 2)) for k in ("pol", "ref")}
  for k, params in (("pol", policy), ("ref", ref)):
    logits, hidden = apply(params)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)  # [n, T, V]
    for s, (i, j, prompt, completion) in enumerate(seqs):
      end = len(prompt) + len(completion)
      want[k][i, j] = sum(logp[s, t - 1, tokens[s, t]] for t in range(len(prompt), end))
      if k == "pol":
        assert n[i, j] == len(completion)
        head = np.float64(heads.scalar_head(policy["reward_head"], hidden[s, end - 1]))
        np.testing.assert_allclose(rewards[i, j], head, atol=1e-5)
        mean_logp = np.mean([logp[s, t - 1, tokens[s, t]] for t in range(len(prompt), end)])
        np.testing.assert_allclose(with_logp[i, j], head + 0.7 * mean_logp, atol=1e-5)
  for k in got:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-4)
  assert not n[1].any() and not got["pol"][1].any()   # the padding pair

  c = dpo_tiny.get_config()
  num, den, _ = jax.jit(lambda p, r: objectives.dpo_loss(p, batch, model, objectives.Context(c, r)))(policy, ref)
  delta = (want["pol"][:, 0] - want["ref"][:, 0]) - (want["pol"][:, 1] - want["ref"][:, 1])
  losses = np.log1p(np.exp(-c.dpo.beta * delta))   # -log sigma(beta * Delta), float64
  np.testing.assert_allclose(float(num) / float(den), losses[rows >= 0].mean(), rtol=1e-5)


FAST_LOSSES = ("sigmoid", "ipo")  # the rest train in `make test-all` (each loss's formula is tested fast)


@pytest.mark.parametrize("loss", [l if l in FAST_LOSSES else pytest.param(l, marks=pytest.mark.slow)
                                  for l in dpo_loss.LOSS_TYPES])
def test_every_dpo_loss_trains(loss, make, tmp_path, capsys):
  smoothing = 0.1 if loss in ("cdpo", "robust") else 0.0
  c = make(dpo_tiny, **{"dpo.loss": loss, "dpo.label_smoothing": smoothing, "optim.lr": 1e-3})
  out = loop.train(c, str(tmp_path / loss))
  assert np.isfinite(out["train/loss"]) and np.isfinite(out["eval/loss"])
  assert {"eval/rewards/accuracy", "eval/rewards/margin", "eval/logps/chosen"} <= set(out)
  uses_ref = loss not in objectives.REFERENCE_FREE
  assert ("eval/kl" in out) == uses_ref
  assert ("reference: frozen copy" in capsys.readouterr().out) == uses_ref
  rows = metrics(tmp_path / loss)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]


def test_precomputed_reference_matches_on_the_fly(make, tmp_path):
  live = loop.train(make(dpo_tiny, **{"optim.lr": 1e-3}), str(tmp_path / "live"))
  pre = make(dpo_tiny, **{"optim.lr": 1e-3, "dpo.precompute_reference": True})
  cached = loop.train(pre, str(tmp_path / "pre"))
  files = os.listdir(tmp_path / "pre" / "reference_logps")
  assert sorted(f.split("-")[0] for f in files) == ["eval", "train"]
  a, b = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
  np.testing.assert_allclose([r["train/loss"] for r in b if "train/loss" in r],
                             [r["train/loss"] for r in a if "train/loss" in r], rtol=1e-5)
  for k in ("eval/loss", "eval/rewards/margin", "eval/kl"):
    np.testing.assert_allclose(cached[k], live[k], rtol=1e-4, atol=1e-6)
  table = np.load(tmp_path / "pre" / "reference_logps" / [f for f in files if f.startswith("train")][0])
  assert table.shape == (397, 2) and np.all(table < 0)  # 3 of the 400 pairs are longer than seq_len: dropped


def test_lora_dpo_uses_the_frozen_base_as_reference(make, tmp_path, monkeypatch, capsys):
  # In the step: the reference handed to the loss IS the frozen tree (no copy, no second argument).
  seen = {}

  def spy(params, batch, model, ctx):
    seen["ref"] = ctx.ref_params
    total = sum(jnp.sum(x) for x in jax.tree.leaves(params))
    return total, jnp.float32(1.0), {}
  spy_objective = objectives.Objective("spy", spy)
  frozen = {"w": jnp.ones((4, 4))}
  cfg = dpo_tiny.get_config()
  cfg.lora.rank, cfg.lora.targets = 2, ["w$"]
  tx, lr = optim.make_optimizer(cfg.optim, 10)
  step = loop.make_train_step(None, spy_objective, tx, lr, 1, cfg.lora, cfg, ref_is_frozen=True)
  adapters = {"w": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 4))}}
  step(adapters, tx.init(adapters), {}, jnp.int32(0), frozen)
  assert seen["ref"] is frozen

  # Through the trainer: only the base is restored (once), and step 1 (adapters' B = 0) is log 2.
  calls = []
  real = rundir.restore_params
  monkeypatch.setattr(rundir, "restore_params", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
  c = make(dpo_tiny, **{"lora.rank": 4, "lora.alpha": 8.0, "optim.lr": 1e-2})
  out = loop.train(c, str(tmp_path / "lora"))
  assert calls == [c.init_from]
  assert "reference: the frozen LoRA base (no copy)" in capsys.readouterr().out
  first = [r for r in metrics(tmp_path / "lora") if r["step"] == 1][0]
  assert abs(first["train/loss"] - LOG2) < 1e-6 and out["train/loss"] < LOG2
  assert abs(out["eval/rewards/margin"]) > 0   # the adapters moved the policy off its reference


def test_config_errors_name_the_key(make):
  cases = [("dpo", {"dpo.loss": "kto"}, "config.dpo.loss"), ("dpo", {"dpo.beta": 0.0}, "config.dpo.beta"),
           ("dpo", {"dpo.loss": "ipo", "dpo.label_smoothing": 0.1}, "config.dpo.label_smoothing"),
           ("dpo", {"dpo.loss": "robust", "dpo.label_smoothing": 0.5}, "config.dpo.label_smoothing"),
           ("dpo", {"dpo.loss": "orpo", "dpo.rpo_alpha": 1.0}, "config.dpo.rpo_alpha"),
           ("dpo", {"dpo.rpo_alpha": -1.0}, "config.dpo.rpo_alpha"),
           ("dpo", {"init_from": ""}, "config.init_from"), ("dpo", {"data.source": "text"}, "config.data.source"),
           ("reward_model", {"reward.loss": "hinge"}, "config.reward.loss"),
           ("reward_model", {"lora.rank": 4}, "config.lora.rank")]
  for name, overrides, key in cases:
    c = make(dpo_tiny if name == "dpo" else reward_tiny, **overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
      objectives.get(name).check(c)
  objectives.get("dpo").check(make(dpo_tiny, init_from="", **{"dpo.loss": "simpo"}))  # no reference needed


RM = {"optim.lr": 1e-3, "data.num_documents": 5000, "log_every": 10, "batch_size": 16}


def test_reward_model_learns_the_builtin_preferences(make, tmp_path, capsys):
  """Fast, weaker check: from an (almost) untrained model, the missing <answer> tag is easy."""
  workdir = str(tmp_path / "rm")
  c = make(reward_tiny, steps=60, **RM)
  out = loop.train(c, workdir)
  assert "reward_head not in it: initialised at random" in capsys.readouterr().out
  print("held-out pair accuracy after 60 steps from a 2-step model:", out["eval/rewards/accuracy"])
  assert out["eval/rewards/accuracy"] >= 0.65   # measured 0.81; 0.75 = tags right, numbers at chance
  ckpt = os.path.join(workdir, "checkpoints")
  assert "reward_head" in rundir.stored_keys(ckpt, rundir.latest_step(workdir))
  rel = os.path.relpath(workdir)  # a relative init_from (PPO reads the reward head from one)
  assert "reward_head" in rundir.stored_keys(rundir.checkpoint_dir(rel), rundir.latest_step(rel))
  mesh = sharding.make_mesh(c.mesh)   # the policy part alone reads back too (the head is skipped)
  abs_p, p_sh, _, _ = abstract_params(Transformer(ModelConfig.from_config(c.model)), 8, mesh)
  assert set(rundir.restore_params(workdir, abs_p, p_sh)[0]) == set(abs_p)
  # eval.preference reads the run back and gives the trainer's held-out numbers.
  ev = preference.evaluate_pairs(workdir)
  assert ev["pairs"] == 100
  np.testing.assert_allclose(ev["accuracy"], out["eval/rewards/accuracy"], atol=1e-6)
  np.testing.assert_allclose(ev["margin"], out["eval/rewards/margin"], rtol=1e-4)
  f = tmp_path / "mine.jsonl"
  f.write_text(json.dumps({"prompt": "What is 2 + 2?", "responses": [
      "2 + 2 = 4. <answer>4</answer>", "2 + 2 = 4. 4", "2 + 2 = 5. 5"]}) + "\n")
  assert preference.evaluate_pairs(workdir, str(f))["pairs"] == 3


def test_reward_model_with_logp_term_scores_the_same_in_rl(make, tmp_path):
  """A reward.logp_weight run: RL and the evaluation (rl/models.py load_reward_model, eval/compare.py
  on chat strings) score each completion as the trainer does on its pair rows."""
  workdir = str(tmp_path / "rm")
  c = make(reward_tiny, steps=2, **{"reward.logp_weight": 2.0})
  loop.train(c, workdir)
  mesh = sharding.make_mesh(c.mesh)
  rm, cfg = load_reward_model(workdir, mesh)
  assert float(rm["reward_head"]["logp_weight"]) == 2.0
  tok = run_tokenizer.load(workdir, c)
  q, answers = "What is 12 + 9?", ["2 + 9 = 11. 1 + 1 = 2. 12 + 9 = 21. <answer>21</answer>", "12 + 9 = 21. 21"]
  ps = pairs.encode_records(tok, [("x", ([{"role": "user", "content": q}], *answers))], c.seq_len,
                            c.data.chat_template)
  with sharding.use_mesh(mesh):
    batch = pairs.make_batch(ps, np.zeros(8, np.int64))   # the pair 8 times: a row per device
    want = objectives.pair_rewards(rm, batch, Transformer(cfg), 2.0)[0]
    got = compare.reward_scores(rm, cfg, tok, [q, q], answers, c.data.chat_template, mesh)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_reward_model_from_sft_reaches_high_heldout_accuracy(data_cache, tmp_path):
  """Pretrain -> SFT -> reward model, all short; held-out accuracy well above chance."""
  pre, sft, rm_dir = (str(tmp_path / n) for n in ("pre", "sft", "rm"))
  loop.train(configure(pretrain_tiny.get_config(), data_cache, steps=300, log_every=50,
                       **{"data.num_documents": 4000, "optim.lr": 3e-3, "optim.warmup_steps": 30}), pre)
  loop.train(configure(sft_tiny.get_config(), data_cache, steps=200, init_from=pre, log_every=50,
                       batch_size=16, **{"data.num_documents": 4000, "optim.lr": 1e-3}), sft)
  out = loop.train(configure(reward_tiny.get_config(), data_cache, init_from=sft, steps=200, **RM), rm_dir)
  print("held-out pair accuracy from SFT:", out["eval/rewards/accuracy"])
  assert out["eval/rewards/accuracy"] >= 0.7   # measured 0.84: tags 1.0, wrong numbers ~0.6
