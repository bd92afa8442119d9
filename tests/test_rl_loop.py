"""The online RL loop (rl/loop.py): rollout masks, the shared-prompt forward, KL = 0 at the start,
GRPO and PPO iterations through the real loop, exact resume, config errors; slow: learning."""
import glob
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, grpo_arith, ppo_arith
from model import decode, lora, sharding
from model.transformer import ModelConfig, Transformer
from rl import algorithms, loop, prompts, rewards, rollout, steps, value
from train import corpus, optim, rundir
from train.params import abstract_params


def _digits(completions, answers, lengths, max_len):
  """A reward with spread on random-weight gibberish: the share of digit characters."""
  return np.array([sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions], np.float32)


@pytest.fixture
def digits_reward(monkeypatch):
  monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "digits", _digits)


def _model(c):
  cfg = ModelConfig.from_config(c.model)
  return cfg, Transformer(cfg)


def _save_run(d, params, config):
  mngr = rundir.manager(d, 1, async_save=False)
  rundir.save(mngr, 1, params, {"count": jnp.zeros((), jnp.int32)}, {"step": 1}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write(config.to_json())
  return d


def _random_run(d, seed, extra=None):
  c = grpo_arith.get_config()
  cfg, model = _model(c)
  mesh = sharding.make_mesh(c.mesh)
  _, shardings, init, _ = abstract_params(model, 8, mesh, extra)
  params = jax.jit(lambda k: sharding.unbox(init(k)), out_shardings=shardings)(jax.random.key(seed))
  return _save_run(d, params, c)


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
  """A tiny 'SFT' run: random weights saved as a checkpoint (start point and reference)."""
  return _random_run(str(tmp_path_factory.mktemp("rl_init")), 3)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
  """A tiny 'reward model' run: random weights and a random reward head."""
  from model import heads
  return _random_run(str(tmp_path_factory.mktemp("rl_rm")), 4, heads.reward_head_params)


def make_config(objective, init_from, data_cache, **kw):
  c = (grpo_arith if objective == "grpo" else ppo_arith).get_config()
  c.init_from, c.data.cache_dir = init_from, data_cache
  c.steps, c.checkpoint_every, c.log_every, c.eval_every = 1, 1, 1, 0
  c.async_checkpoints = False
  c.rl.num_eval_problems, c.rl.eval_at_start = 0, False
  c.rl.max_prompt_len, c.rl.max_new_tokens = 48, 12
  c.rl.rewards.answer_match, c.rl.rewards.digits = 0.0, 1.0
  c.optim.lr = 1e-3
  if objective == "grpo":
    c.batch_size, c.rl.num_generations, c.rl.num_iterations, c.rl.num_minibatches = 8, 4, 1, 1
  else:
    c.batch_size, c.rl.num_iterations, c.rl.num_minibatches = 16, 2, 2
  c.update_from_flattened_dict(kw)  # 'a.b' keys
  return c


def rows(workdir, name="metrics.jsonl"):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(line) for line in f]


def restore(workdir, c):
  cfg, model = _model(c)
  mesh = sharding.make_mesh(c.mesh)
  abs_p, sh, _, _ = abstract_params(model, 8, mesh)
  return rundir.restore_params(workdir, abs_p, sh)[0]


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- rollout pieces


def _random_params(cfg, seed=0):
  model = Transformer(cfg)
  return sharding.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.mark.parametrize("g", [1, 3])
def test_completion_forward_equals_the_plain_forward_with_gradients(g):
  cfg = ModelConfig.from_config(grpo_arith.get_config().model)
  params = _random_params(cfg)
  rng = np.random.default_rng(0)
  n, p, t = 2, 7, 5
  prompt = rng.integers(6, 500, (n, p)).astype(np.int32)
  pmask = np.ones((n, p), np.int32)
  pmask[0, :3] = 0
  comp = rng.integers(6, 500, (n * g, t)).astype(np.int32)
  full = np.concatenate([np.repeat(prompt, g, 0), comp], 1)
  fmask = np.concatenate([np.repeat(pmask, g, 0), np.ones_like(comp)], 1)
  pos = np.maximum(np.cumsum(fmask, -1) - 1, 0)

  def shared(q):
    logits, hidden = rollout.forward(q, cfg, prompt, pmask, comp, g, hidden=True)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 9]) + jnp.sum(hidden[..., 0]), (logits, hidden)

  def plain(q):
    logits, hidden = Transformer(cfg).apply({"params": q}, full, pos, fmask, return_hidden=True)
    logits, hidden = logits[:, p - 1:p - 1 + t], hidden[:, p - 1:p - 1 + t]
    return jnp.sum(jax.nn.log_softmax(logits)[..., 9]) + jnp.sum(hidden[..., 0]), (logits, hidden)

  (_, a), ga = jax.jit(jax.value_and_grad(shared, has_aux=True))(params)
  (_, b), gb = jax.jit(jax.value_and_grad(plain, has_aux=True))(params)
  np.testing.assert_allclose(a[0], b[0], atol=2e-5)
  np.testing.assert_allclose(a[1], b[1], atol=2e-5)
  assert max_diff(ga, gb) < 1e-4


def test_group_sampling_equals_plain_sampling_and_masks_stop_at_the_stop_token():
  cfg = ModelConfig.from_config(grpo_arith.get_config().model)
  params = _random_params(cfg, 1)
  tok, mask = decode.left_pad([[7, 8, 9, 10], [11, 12]], pad_id=0)
  stops = list(range(6, 200))  # many stop ids: rows end at different lengths
  kw = dict(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, stop_ids=stops, pad_id=0)
  got = rollout.sample(params, cfg, tok, mask, jax.random.key(5), 4, **kw)
  want = decode.generate(params, cfg, np.repeat(tok, 4, 0), np.repeat(mask, 4, 0), jax.random.key(5), **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  toks, m, lengths = np.asarray(got.tokens), np.asarray(got.mask), np.asarray(got.lengths)
  assert len(set(lengths.tolist())) > 1
  for row, mrow, n in zip(toks, m, lengths):
    assert mrow[:n].all() and not mrow[n:].any()
    assert (row[n:] == 0).all()
    assert n == 12 or row[n - 1] in stops


def _batch(cfg, params, g=4):
  """A scored rollout of 2 prompts (one left-padded) with early stops, as the loop builds it."""
  tok, mask = decode.left_pad([[7, 8, 9, 10, 11], [12, 13]], pad_id=0)
  gen = rollout.sample(params, cfg, tok, mask, jax.random.key(2), g, max_new_tokens=10, temperature=1.0,
                       top_k=0, top_p=1.0, stop_ids=list(range(6, 150)), pad_id=0)
  return {"prompt": jnp.asarray(tok), "prompt_mask": jnp.asarray(mask), "tokens": gen.tokens,
          "mask": gen.mask}


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_prompt_and_padding_never_reach_a_loss_a_kl_or_a_gradient(objective, tmp_path):
  c = make_config(objective, "x", str(tmp_path), **{"rl.kl_placement": "in_loss",
                                                    "rl.num_minibatches": 1, "batch_size": 8})
  if objective == "ppo":
    c.rl.value_model, c.rl.num_generations = "policy", 4
  cfg, _ = _model(c)
  params = _random_params(cfg, 2)
  if objective == "ppo":
    params = {**params, "value_head": {"kernel": jnp.ones((cfg.d_model,)) * 0.1, "bias": jnp.zeros(())}}
  b = _batch(cfg, params)
  ref = jax.tree.map(lambda x: x * 1.01, params)
  b.update(jax.jit(steps.make_score_fn(cfg, c, None, old=True, ref=True))(params, None, ref, None, None, b))
  scores = jnp.arange(8, dtype=jnp.float32) % 3
  b.update(algorithms.get(objective).advantages(c, scores, b, 0.1))
  off = 1 - np.asarray(b["mask"])
  assert off.sum() > 0
  assert np.all(np.asarray(b["old_logp"])[off > 0] == 0) and np.all(np.asarray(b["ref_logp"])[off > 0] == 0)
  junk = dict(b)
  junk["prompt"] = jnp.where(b["prompt_mask"] == 0, 321, b["prompt"])             # left padding
  junk["tokens"] = jnp.where(b["mask"] == 0, 123, b["tokens"])                     # after the stop
  for k in ("old_logp", "ref_logp") + (("old_values", "returns") if objective == "ppo" else ()):
    junk[k] = jnp.where(b["mask"] == 0, 7.0, b[k])
  if objective == "ppo":
    junk["advantages"] = jnp.where(b["mask"] == 0, 5.0, b["advantages"])
  tx, lr = optim.make_optimizer(c.optim, 10)
  step = jax.jit(steps.make_update_step(cfg, c, tx, lr, None))
  outs = [step(params, tx.init(params), None, None, None, x, jnp.float32(0.1), jnp.int32(0)) for x in (b, junk)]
  (p1, _, _, _, _, m1), (p2, _, _, _, _, m2) = outs
  assert max_diff(p1, params) > 0
  assert max_diff(p1, p2) < 1e-6
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_reference_equals_policy_at_the_start_under_lora():
  c = grpo_arith.get_config()
  c.lora.rank, c.rl.num_generations = 4, 4
  cfg, _ = _model(c)
  base = _random_params(cfg, 4)
  adapters = lora.init_adapters(base, c.lora, jax.random.key(0))
  b = _batch(cfg, base)
  out = jax.jit(steps.make_score_fn(cfg, c, c.lora, old=True, ref=True))(adapters, base, None, None, None, b)
  np.testing.assert_array_equal(out["old_logp"], out["ref_logp"])
  assert float(jnp.sum(jnp.abs(out["old_logp"]))) > 0


# ----------------------------------------------------------------------------- the loop


def test_grpo_iterations_train_and_resume_exactly(init_run, data_cache, tmp_path, digits_reward):
  workdir = str(tmp_path / "run")
  out = loop.train(make_config("grpo", init_run, data_cache, steps=3), workdir)
  assert out["step"] == 3
  m = [r for r in rows(workdir) if "train/loss" in r]
  assert [r["step"] for r in m] == [1, 2, 3]
  first = m[0]
  assert abs(first["train/kl_per_completion"]) < 1e-5 and abs(first["train/kl"]) < 1e-6  # ref == policy
  for k in ("train/rewards/digits/mean", "train/rewards/digits/std", "train/entropy", "train/clip_fraction",
            "train/completion_length", "train/zero_spread_fraction", "train/rollout_tokens_per_sec",
            "train/update_tokens_per_sec", "train/reward", "train/beta"):
    assert np.isfinite(first[k]), k
  c = make_config("grpo", init_run, data_cache)
  assert max_diff(restore(workdir, c), restore(init_run, c)) > 0
  assert m[-1]["train/kl_per_completion"] > 0

  # Ctrl-C during iteration 2 (from inside the reward function): the loop saves iteration 2 and
  # stops; rerunning the command resumes at iteration 3 with the prompts and samples of the run above.
  calls = []

  def interrupting(completions, answers, lengths, max_len):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return _digits(completions, answers, lengths, max_len)

  rewards.REWARD_FUNCTIONS["digits"] = interrupting
  resumed = str(tmp_path / "resumed")
  assert loop.train(make_config("grpo", init_run, data_cache, steps=3), resumed)["step"] == 2
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["1", "2"]
  rewards.REWARD_FUNCTIONS["digits"] = _digits
  assert loop.train(make_config("grpo", init_run, data_cache, steps=3), resumed)["step"] == 3
  third = lambda d, n: [r for r in rows(d, n) if r["step"] == 3]
  assert third(resumed, "samples.jsonl") == third(workdir, "samples.jsonl")  # same prompts and samples
  a, b = third(workdir, "metrics.jsonl")[0], third(resumed, "metrics.jsonl")[0]
  for k in ("train/reward", "train/loss", "train/kl_per_completion", "train/grad_norm"):
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_ppo_iteration_lora_policy_reward_model_and_critic(init_run, reward_run, data_cache, tmp_path,
                                                          digits_reward, capsys):
  """PPO with LoRA adapters (the reference is their frozen base), a reward model, and a separate
  critic started from the reward model (trunk + reward head as the value head), as in TRL; its one
  iteration is also profiled (config.profile)."""
  workdir = str(tmp_path / "ppo")
  c = make_config("ppo", init_run, data_cache, **{"lora.rank": 4, "rl.reward_model": reward_run,
                                                   "profile.start_step": 1})
  out = loop.train(c, workdir)
  assert out["step"] == 1
  log = capsys.readouterr().out
  assert f"critic initialised from {reward_run}" in log and "reference: the frozen LoRA base" in log
  assert "profile of steps 1-1 written under" in log  # the run ended inside the 3 profiled steps
  assert len(glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))) == 1
  m = [r for r in rows(workdir) if "train/loss" in r][0]
  for k in ("train/value_loss", "train/policy_loss", "train/explained_variance", "train/approx_kl",
            "train/clip_fraction", "train/kl_per_completion", "train/entropy", "train/non_score_reward",
            "train/rewards/reward_model/mean", "train/rewards/digits/mean"):
    assert np.isfinite(m[k]), k
  assert m["train/value_loss"] > 0 and abs(m["train/kl_per_completion"]) < 1e-5
  cfg, model = _model(c)
  mesh = sharding.make_mesh(c.mesh)
  abs_p, sh, _, _ = abstract_params(model, 8, mesh, value.value_head_params)
  critic, _ = rundir.restore_params(os.path.join(workdir, "critic"), abs_p, sh)
  from model import heads
  abs_rm, sh_rm, _, _ = abstract_params(model, 8, mesh, heads.reward_head_params)
  rm, _ = rundir.restore_params(reward_run, abs_rm, sh_rm)
  moved = float(jnp.max(jnp.abs(critic["value_head"]["kernel"] - rm["reward_head"]["kernel"])))
  assert 0 < moved < 0.1  # started as the reward head, then trained
  policy = restore(workdir, c)  # LoRA adapters merged into the base
  assert max_diff(policy, restore(init_run, c)) > 0


def test_oversample_trains_on_the_groups_with_reward_spread(init_run, data_cache, tmp_path, monkeypatch):
  """rl.oversample=2: 4 prompts sampled, the 2 trained on are those whose rewards differ (here: the
  odd answers, scored by completion length; even answers all score 0), in sampling order."""
  odd = lambda a: int(a) % 2 == 1
  monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "digits", lambda completions, answers, lengths, max_len: np.array(
      [len(c) / 100 if odd(a) else 0.0 for c, a in zip(completions, answers)], np.float32))
  c = make_config("grpo", init_run, data_cache, **{"rl.oversample": 2.0})
  loop.train(c, str(tmp_path))
  sampled = corpus.train_problems((c.seed, 0, prompts.STREAM), 4)
  want = ([p.question for p in sampled if odd(p.answer)] + [p.question for p in sampled if not odd(p.answer)])[:2]
  assert [r["prompt"] for r in rows(str(tmp_path), "samples.jsonl")] == want
  m = [r for r in rows(str(tmp_path)) if "train/loss" in r][0]
  n_odd = sum(odd(p.answer) for p in sampled)
  assert m["train/zero_spread_fraction"] == 1 - n_odd / 4  # of every sampled group
  assert m["train/picked_zero_spread_fraction"] == max(0, 2 - n_odd) / 2
  with pytest.raises(ValueError, match="config.rl.oversample"):
    loop.check_config(make_config("ppo", init_run, data_cache, **{"rl.oversample": 2.0}))


def test_config_errors_name_the_key(init_run, data_cache, digits_reward):
  with pytest.raises(ValueError, match="config.rl.num_generations"):
    loop.check_config(make_config("grpo", init_run, data_cache, **{"rl.num_generations": 3}))
  with pytest.raises(ValueError, match="config.rl.loss_agg"):
    loop.check_config(make_config("grpo", init_run, data_cache, **{"rl.loss_agg": "mean"}))
  with pytest.raises(ValueError, match="config.init_from"):
    loop.check_config(make_config("ppo", "", data_cache))
  c = make_config("grpo", init_run, data_cache)
  with c.unlocked():
    c.rl.typo = 1
  with pytest.raises(ValueError, match="config.rl.typo"):
    loop.check_config(c)
  assert loop.check_config(make_config("ppo", init_run, data_cache))["data"] == jax.device_count()


def test_jsonl_prompts_name_file_and_line_and_resume(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "What is 2+2?", "answer": 4}\n\n'
                  '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}\n')
  recs = prompts.read(str(path))
  assert recs[0].answer == "4" and recs[1].messages[0]["role"] == "system"
  with pytest.raises(ValueError, match=r"p.jsonl:3: needs an 'answer'"):
    prompts.read(str(path), need_answer=True)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: .*assistant"):
    prompts.read(str(bad))
  src = prompts.PromptSource(3, seed=0, records=recs * 2)
  seen = [src.next() for _ in range(2)]
  again = prompts.PromptSource(3, seed=0, records=recs * 2)
  again.set_state(json.loads(json.dumps({"iteration": 1, "consumed": 3})))
  assert again.next() == seen[1]


# ----------------------------------------------------------------------------- learning (slow)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  """The demo's pretraining and SFT (configs/demo.py, ~4 min), or $KILN_SFT_RUN (its sft dir)."""
  if os.environ.get("KILN_SFT_RUN"):
    return os.environ["KILN_SFT_RUN"]
  from train import loop as train_loop
  d = tmp_path_factory.mktemp("demo")
  stages = demo.get_config()
  for name, init_from in (("pretrain", ""), ("sft", str(d / "pretrain"))):
    c = stages[name]
    c.data.cache_dir, c.init_from = str(d / "cache"), init_from
    train_loop.train(c, str(d / name))
  return str(d / "sft")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_rl_raises_heldout_accuracy(objective, sft_run, tmp_path):
  """The demo's GRPO and PPO stages, from its SFT model (half its demonstrations sloppy), on the
  held-out problems the loop evaluates before and after training."""
  c = demo.get_config()[objective]
  c.init_from = sft_run
  c.data.cache_dir = rundir.load_config(sft_run).data.cache_dir  # the same tokenizer
  c.eval_every = 0
  out = loop.train(c, str(tmp_path / objective))
  evals = [r for r in rows(str(tmp_path / objective)) if "eval/accuracy" in r]
  before, after = evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]
  print(f"{objective}: held-out accuracy {before:.3f} -> {after:.3f}")
  # `make demo`, 3 seeds (200 held-out problems): GRPO +28.0 points, PPO +19.7, none under +19.5
  assert after >= before + 0.10, (before, after)
  assert out["eval/format"] > 0.9


def test_builtin_prompts_of_two_seeds_share_no_iteration():
  """Seeds give disjoint prompt streams (seed + iteration made seeds 0 and 1 share 59 of 60
  iterations), and iteration 0 is not the SFT corpus's first problems (train_problems(0, n))."""
  a, b = prompts.PromptSource(16, seed=0), prompts.PromptSource(16, seed=1)
  seen_a = {p.messages[0]["content"] for _ in range(5) for p in a.next()}
  seen_b = {p.messages[0]["content"] for _ in range(5) for p in b.next()}
  sft = {p.question for p in corpus.train_problems(0, 80)}
  assert len(seen_a) > 70 and len(seen_a & seen_b) < 5 and len(seen_a & sft) < 5
