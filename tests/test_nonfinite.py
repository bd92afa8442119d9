"""Non-finite updates never reach the weights (train/finite.py): a skipped update leaves the state
bit for bit (offline and RL steps, with a critic), and a real blow-up (config.optim.lr=1e6 on a
resumed run) stops after config.max_nonfinite_steps in a row, naming a checkpoint a sane rerun
trains on from."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import base
from configs.errors import UserError
from model import sharding
from rl import algorithms, steps as rl_steps
from tests.test_rl_loop import _batch, _model, _random_params, make_config
from tests.test_sharding import setup
from train import loop, objectives, optim, rundir
from train.params import abstract_params


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_offline_step_skips_a_non_finite_update_bit_for_bit():
  model, params, batch, _ = setup()
  tx, lr = optim.make_optimizer(base.base_config().optim, 10)
  step = jax.jit(loop.make_train_step(model, objectives.get("pretrain"), tx, lr, 1))
  opt = tx.init(params)
  good = jax.tree.map(jnp.asarray, batch)
  p, o, m = step(params, opt, good, jnp.int32(3))
  assert float(m["train/skipped"]) == 0.0
  @jax.jit
  def plain(params, opt):  # the update without the guard: on a finite step the guard changes nothing
    grads = jax.grad(lambda q: (lambda n, d, _: n / d)(*objectives.next_token_loss(q, good, model)))(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt
  want = plain(params, opt)
  for x, y in zip(jax.tree.leaves((p, o)), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
  for nan_in in ("loss_mask", "params"):
    bad, start = dict(good), params
    if nan_in == "loss_mask":
      bad["loss_mask"] = good["loss_mask"] * jnp.float32("nan")   # NaN loss and gradient
    else:
      start = jax.tree.map(lambda x: x * 1e30, params)             # huge params: non-finite
    p, o, m = step(start, opt, bad, jnp.int32(3))
    assert float(m["train/skipped"]) == 1.0, nan_in
    assert not (np.isfinite(m["train/loss"]) and np.isfinite(m["train/grad_norm"]))
    assert_same(p, start)
    assert_same(o, opt)


def test_rl_update_skips_a_non_finite_update_bit_for_bit(tmp_path):
  """PPO with a separate critic (the GRPO family runs the same update step without one): NaN
  rewards give NaN advantages and returns; policy, critic and both optimizer states stay as they were."""
  objective = "ppo"
  c = make_config(objective, "x", str(tmp_path), **{"rl.num_minibatches": 1, "batch_size": 8})
  c.rl.num_generations = 4
  cfg, _ = _model(c)
  params = _random_params(cfg, 2)
  critic_cfg = cfg
  critic = {**_random_params(cfg, 3), "value_head": {"kernel": jnp.ones((cfg.d_model,)) * 0.1,
                                                     "bias": jnp.zeros(())}}
  b = _batch(cfg, params)
  b.update(jax.jit(rl_steps.make_score_fn(cfg, c, None, old=True, ref=True, critic_cfg=critic_cfg))(
      params, None, params, critic, None, b))
  tx, lr = optim.make_optimizer(c.optim, 10)
  update = jax.jit(rl_steps.make_update_step(cfg, c, tx, lr, None, critic_cfg))
  opt, copt = tx.init(params), tx.init(critic)
  for scores, skipped in ((jnp.arange(8, dtype=jnp.float32) % 3, 0.0), (jnp.full((8,), jnp.nan), 1.0)):
    mb = {**b, **algorithms.get(objective).advantages(c, scores, b, 0.1)}
    p, o, cr, co, _, m = update(params, opt, critic, copt, None, mb, jnp.float32(0.1), jnp.int32(0))
    assert float(m["skipped"]) == skipped
    if skipped:
      assert not np.isfinite(m["loss"])
      assert_same((p, o, cr, co), (params, opt, critic, copt))
    else:
      for new, old in ((p, params), (cr, critic)):
        assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(old))) > 0


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}


def test_a_blown_up_run_stops_and_a_sane_rerun_trains_on_from_the_named_checkpoint(tiny_config, tmp_path,
                                                                                   capsys):
  """lr=1e6 from step 7 on: step 7's update is finite but wrecks the params (every later gradient is
  NaN). Steps 8-10 are skipped, the run stops (max_nonfinite_steps=2), checkpoint 7 (the wrecked
  params) is moved to checkpoints-corrupt/, and the error names step 6, which a rerun at the old lr trains on from."""
  workdir = str(tmp_path / "run")
  def config(steps, lr):
    c = tiny_config(steps=steps, checkpoint_every=1, log_every=1, max_nonfinite_steps=2)
    c.optim.schedule, c.optim.warmup_steps, c.optim.lr = "constant", 0, lr
    return c
  loop.train(config(6, 3e-3), workdir)
  with pytest.raises(UserError, match=r"3 non-finite steps in a row \(steps 8-10\), more than "
                                      r"config\.max_nonfinite_steps=2: stopping; moved the checkpoints "
                                      r"of steps \[7\].*the last good checkpoint is step 6 in") as e:
    loop.train(config(20, 1e6), workdir)
  assert "config.optim.lr" in e.value.hint and "resumes from step 6" in e.value.hint
  out = capsys.readouterr().out
  assert "step 8: non-finite train/grad_norm nan: update skipped (1 in a row" in out
  m = _metrics(workdir)
  assert m[7]["train/skipped"] == 0 and m[8]["train/skipped"] == 1 and 10 not in m  # the stop is not logged
  c = config(20, 1e6)
  mesh = sharding.make_mesh(c.mesh)
  abs_p, sh, _, _ = abstract_params(_model(c)[1], c.seq_len, mesh)
  on_disk = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
  assert sorted(on_disk) == [5, 6]  # keep_checkpoints=3 kept 5-7; 7 was moved aside, not deleted
  assert os.listdir(os.path.join(workdir, "checkpoints-corrupt")) == ["7-nonfinite"]
  for s in on_disk:
    params, _ = rundir.restore_params(workdir, abs_p, sh, step=s)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), s
  assert loop.train(config(10, 3e-3), workdir)["step"] == 10
  m = _metrics(workdir)
  assert all(m[s]["train/skipped"] == 0 and np.isfinite(m[s]["train/loss"]) for s in range(7, 11))
  assert m[10]["train/loss"] < m[1]["train/loss"]
