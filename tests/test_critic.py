"""PPO's separate critic trains with its own optimizer (rl.critic_lr, rl/value.py critic_optimizer)."""
import jax
import jax.numpy as jnp
import numpy as np

from rl import algorithms, steps as rl_steps, value
from tests.test_rl_loop import _batch, _model, _random_params, make_config
from train import optim


def test_critic_lr_scales_the_critics_first_adam_step_and_leaves_the_policy_bit_for_bit(tmp_path):
  """rl.critic_lr: Adam's first update is -lr * g / (|g| + eps), so every critic weight with a
  gradient moves by ~critic_lr, 10x as far at 10 x lr; the policy's update and optimizer state are
  the same bits whatever the critic's lr."""
  c = make_config("ppo", "x", str(tmp_path), **{"rl.num_minibatches": 1, "batch_size": 8})
  c.rl.num_generations = 4
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-4, 0, 0.0
  cfg, _ = _model(c)
  params = _random_params(cfg, 2)
  critic = {**_random_params(cfg, 3), "value_head": {"kernel": jnp.full((cfg.d_model,), 0.1), "bias": jnp.zeros(())}}
  b = _batch(cfg, params)
  b.update(jax.jit(rl_steps.make_score_fn(cfg, c, None, old=True, ref=True, critic_cfg=cfg))(
      params, None, params, critic, None, b))
  b.update(algorithms.get("ppo").advantages(c, jnp.arange(8, dtype=jnp.float32) % 3, b, 0.1))
  tx, lr = optim.make_optimizer(c.optim, 10)

  def one_update(critic_lr):
    c.rl.critic_lr = critic_lr
    ctx = value.critic_optimizer(c, 10)[0]
    update = jax.jit(rl_steps.make_update_step(cfg, c, tx, lr, None, cfg, ctx))
    out = update(params, tx.init(params), critic, ctx.init(critic), None, b, jnp.float32(0.1), jnp.int32(0))
    return jax.device_get(out[:4])

  same_lr, ten_x = one_update(0.0), one_update(1e-3)                # 0 = config.optim.lr
  for x, y in zip(jax.tree.leaves(ten_x[:2]), jax.tree.leaves(same_lr[:2]), strict=True):
    np.testing.assert_array_equal(x, y)                              # policy and its optimizer state
  start = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(critic)])
  small, large = [np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(out[2])]) - start
                  for out in (same_lr, ten_x)]
  big = np.abs(small) > 0.5e-4                                       # weights whose gradient is >> eps
  assert big.mean() > 0.5
  np.testing.assert_allclose(np.median(np.abs(small[big])), 1e-4, rtol=0.01)
  assert np.abs(small).max() < 1.02e-4 and np.abs(large).max() < 1.02e-3
  np.testing.assert_allclose(large[big], 10 * small[big], rtol=0.02)
  ratio = np.linalg.norm(large) / np.linalg.norm(small)
  assert 9.5 < ratio < 10.5, ratio
