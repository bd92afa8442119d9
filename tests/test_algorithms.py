"""The registry of online algorithms (rl/algorithms.py): every algorithm is a record, an unknown
objective names the known ones, and each record's advantages and loss, through the generic update
loss of rl/steps.py, match float64 NumPy references on random inputs (GRPO's family: DAPO, Dr. GRPO,
RLOO, GSPO; PPO)."""
import jax.numpy as jnp
import numpy as np
import pytest

from configs import grpo_arith, ppo_arith
from rl import algorithms, steps
from rl import config as rl_config

N, G, T, V = 3, 4, 6, 11  # prompts, completions per prompt, completion tokens, vocabulary
BETA = 0.07

# The GRPO family as rl.* keys of the one grpo record.
GRPO_VARIANTS = {
    "grpo": {},
    "dapo": {"eps_high": 0.28, "loss_agg": "token_mean"},
    "dr_grpo": {"scale": "none", "loss_agg": "dr_grpo"},
    "rloo": {"estimator": "rloo"},
    "gspo": {"ratio_level": "sequence", "scale": "batch"},
}


def test_registry_holds_every_algorithm():
  assert sorted(algorithms.ALGORITHMS) == ["grpo", "gspo", "ppo", "rloo"]
  for name, algo in algorithms.ALGORITHMS.items():
    assert algo.name == name and algorithms.get(name) is algo
  grpo, ppo = algorithms.get("grpo"), algorithms.get("ppo")
  assert (grpo.kl_placement, ppo.kl_placement) == ("in_loss", "in_reward")
  assert not grpo.uses_values and ppo.uses_values
  assert (grpo.min_generations, ppo.min_generations) == (2, 1)
  for name in ("rloo", "gspo"):
    algo = algorithms.get(name)
    assert (algo.kl_placement, algo.uses_values, algo.min_generations) == ("in_loss", False, 2)
  c = ppo_arith.get_config()
  assert algorithms.kl_placement(c) == "in_reward" and algorithms.value_model(c) == c.rl.value_model
  c.rl.kl_placement = "in_loss"
  assert algorithms.kl_placement(c) == "in_loss"
  assert algorithms.value_model(grpo_arith.get_config()) is None


def test_unknown_objective_names_the_known_ones():
  known = r"the online algorithms are \['grpo', 'gspo', 'ppo', 'rloo'\]"
  with pytest.raises(ValueError, match=r"config.objective='reinforce': " + known):
    algorithms.get("reinforce")
  c = grpo_arith.get_config()
  c.objective = "reinforce"
  with pytest.raises(ValueError, match=known):
    rl_config.check(c)


@pytest.mark.parametrize("variant", sorted(GRPO_VARIANTS))
def test_grpo_family_configs_are_valid(variant):
  c = _config("grpo", GRPO_VARIANTS[variant])
  c.init_from = "x"
  rl_config.check(c)


# ----------------------------------------------------------------------------- numerics


def _config(objective, overrides):
  c = (ppo_arith if objective == "ppo" else grpo_arith).get_config()
  c.objective = objective
  c.batch_size, c.rl.num_generations, c.rl.max_new_tokens = N * G, G, T + 2
  c.rl.beta = BETA
  for k, v in overrides.items():
    c.rl[k] = v
  return c


def _inputs(seed):
  """A random scored rollout: log-probs of the policy, pi_old and the reference, logits, a mask with
  rows of different lengths (one full, one of a single token), scores with one all-equal group."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, N * G)
  lengths[0], lengths[1] = T, 1
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)               # [r, T]
  logp, old, ref = (rng.normal(-1.5, 0.3, (N * G, T)).astype(np.float32) * mask for _ in range(3))
  logits = rng.normal(0, 1, (N * G, T, V)).astype(np.float32)
  scores = rng.normal(0.5, 1.0, N * G).astype(np.float32)
  scores[G:2 * G] = 0.25
  values = rng.normal(0, 1, (N * G, T)).astype(np.float32) * mask
  return dict(mask=mask, logp=logp, old=old, ref=ref, logits=logits, scores=scores, values=values)


def _np_masked_mean(x, m):
  return np.sum(x * m) / max(np.sum(m), 1.0)


def _np_k(kind, logp, ref):
  lr = logp - ref
  return {"k1": lr, "k2": 0.5 * lr ** 2, "k3": np.expm1(-lr) + lr}[kind]


def _np_group_advantages(scores, r):
  groups = scores.reshape(N, G)
  if r.estimator == "grpo":
    adv = groups - groups.mean(1, keepdims=True)
  else:
    adv = groups - (groups.sum(1, keepdims=True) - groups) / (G - 1)
  scale = r.scale or ("group" if r.estimator == "grpo" else "none")
  if scale == "group":
    adv = adv / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
  elif scale == "batch":
    adv = adv / (groups.std(ddof=1) + 1e-4)
  adv[groups.max(1) == groups.min(1)] = 0.0
  return adv.reshape(-1)


def _np_grpo_loss(r, x):
  """The loss of one update of the grpo record, KL to the reference in the loss, in float64."""
  f = {k: np.asarray(v, np.float64) for k, v in x.items()}
  mask = f["mask"]
  adv = _np_group_advantages(f["scores"], r)[:, None]                              # [r, 1]
  log_ratio = f["logp"] - f["old"]
  if r.ratio_level == "sequence":
    log_ratio = np.repeat((np.sum(log_ratio * mask, 1) / mask.sum(1))[:, None], T, 1)
  ratio = np.exp(log_ratio)
  per_token = -np.minimum(ratio * adv, np.clip(ratio, 1 - r.eps_low, 1 + r.eps_high) * adv)
  per_token = (per_token + BETA * _np_k(r.kl_estimator, f["logp"], f["ref"])) * mask
  if r.loss_agg == "grpo":
    return np.mean(per_token.sum(1) / mask.sum(1))
  if r.loss_agg in ("token_mean", "bnpo"):
    return per_token.sum() / mask.sum()
  return per_token.sum() / (N * G * r.max_new_tokens)


def _np_entropy(logits):
  """Per-token entropy [r, T] of logits [r, T, V], in float64."""
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return -(np.exp(logp) * logp).sum(-1)


def _update_loss(c, x, batch):
  """The generic update loss (rl/steps.py) of the config's algorithm on the random inputs."""
  algo = algorithms.get(c.objective)
  batch = {**batch, "mask": jnp.asarray(x["mask"]), "old_logp": jnp.asarray(x["old"]),
           "ref_logp": jnp.asarray(x["ref"])}
  batch.update(algo.advantages(c, jnp.asarray(x["scores"]), batch, BETA))
  loss, metrics = steps._loss(c, algo, jnp.asarray(x["logp"]), jnp.asarray(_np_entropy(x["logits"])),
                              jnp.asarray(x["values"]), batch, BETA)
  return batch, float(loss), metrics


@pytest.mark.parametrize("variant", sorted(GRPO_VARIANTS))
def test_grpo_family_loss_matches_numpy(variant):
  c = _config("grpo", GRPO_VARIANTS[variant])
  x = _inputs(1)
  batch, loss, metrics = _update_loss(c, x, {})
  np.testing.assert_allclose(batch["advantages"], _np_group_advantages(x["scores"].astype(np.float64), c.rl),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, _np_grpo_loss(c.rl, x), rtol=1e-5, atol=1e-6)
  kl = _np_masked_mean(_np_k("k3", x["logp"].astype(np.float64), x["ref"]), x["mask"])
  np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)


# The records of GRPO's family besides grpo, and the rl.* keys they fix (the references read them).
RECORD_KEYS = {"rloo": {"estimator": "rloo"}, "gspo": {"ratio_level": "sequence"}}


@pytest.mark.parametrize("objective", sorted(RECORD_KEYS))
def test_rloo_and_gspo_records_match_numpy(objective):
  c = _config(objective, {"scale": "batch"} if objective == "gspo" else {})
  c.init_from = "x"
  rl_config.check(c)
  x = _inputs(3)
  batch, loss, _ = _update_loss(c, x, {})
  r = _config("grpo", {**RECORD_KEYS[objective], **({"scale": "batch"} if objective == "gspo" else {})}).rl
  np.testing.assert_allclose(batch["advantages"], _np_group_advantages(x["scores"].astype(np.float64), r),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, _np_grpo_loss(r, x), rtol=1e-5, atol=1e-6)
  plain, plain_loss, _ = _update_loss(_config("grpo", {}), x, {})  # and it is not plain GRPO
  assert not np.allclose(loss, plain_loss) or not np.allclose(batch["advantages"], plain["advantages"])


def _np_gae(rewards, values, mask, gamma, lam):
  adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
  for i in range(rewards.shape[0]):
    next_v = next_a = 0.0
    for t in reversed(range(rewards.shape[1])):
      if not mask[i, t]:
        continue
      next_a = rewards[i, t] + gamma * next_v - values[i, t] + gamma * lam * next_a
      next_v = values[i, t]
      adv[i, t], ret[i, t] = next_a, next_a + values[i, t]
  return adv, ret


def _np_whiten(x, mask):
  mean = _np_masked_mean(x, mask)
  var = _np_masked_mean((x - mean) ** 2, mask)
  return (x - mean) / np.sqrt(var + 1e-8) * mask


@pytest.mark.parametrize("placement", ["", "in_loss"])
def test_ppo_advantages_and_loss_match_numpy(placement):
  """PPO's default puts beta * kl_t (rl.kl_estimator of pi_old to the reference) into the per-token
  rewards; in_loss puts beta * kl_t of pi into the loss instead (token mean)."""
  c = _config("ppo", {"kl_placement": placement, "ent_coef": 0.0})
  r = c.rl
  x = _inputs(2)
  f = {k: np.asarray(v, np.float64) for k, v in x.items()}
  mask = f["mask"]
  batch, loss, metrics = _update_loss(c, x, {"old_values": jnp.asarray(x["values"])})

  kl_old = _np_k(r.kl_estimator, f["old"], f["ref"]) * mask if not placement else np.zeros_like(mask)
  last = (np.arange(T)[None] == mask.sum(1)[:, None] - 1) * mask
  rewards = -BETA * kl_old + last * f["scores"][:, None]
  if r.whiten_rewards:
    rewards = _np_whiten(rewards, mask) + _np_masked_mean(rewards, mask) * mask
  adv, ret = _np_gae(rewards, f["values"], mask, r.gamma, r.lam)
  if r.whiten_advantages:
    adv = _np_whiten(adv, mask)
  np.testing.assert_allclose(batch["advantages"], adv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(batch["returns"], ret, rtol=1e-4, atol=1e-5)

  ratio = np.exp(f["logp"] - f["old"])
  clipped = np.clip(ratio, 1 - r.eps_low, 1 + r.eps_low)  # PPO clips with eps_low on both sides
  pi_loss = _np_masked_mean(np.maximum(-adv * ratio, -adv * clipped), mask)
  # the policy's own values are the old ones: V - V_old = 0, so the clipped value loss is plain
  v_loss = 0.5 * _np_masked_mean((f["values"] - ret) ** 2, mask)
  want = pi_loss + r.vf_coef * v_loss
  if placement == "in_loss":
    want += BETA * _np_masked_mean(_np_k(r.kl_estimator, f["logp"], f["ref"]), mask)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["policy_loss"], pi_loss, rtol=1e-5, atol=1e-6)
