"""The reward model's score where RL and the evaluation read it (rl/steps.py reward_model_scores,
prompt left-padded, completion right-padded, a shared-prompt KV cache for g > 1) against a float64
NumPy reference on the plain model: the head on the state after the last completion token, plus
reward_head["logp_weight"] x the mean log-prob of the completion's tokens."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import reward_tiny
from model import heads, sharding
from model.transformer import ModelConfig, Transformer
from rl import steps


def test_reward_model_scores_match_float64_reference():
  cfg = ModelConfig.from_config(reward_tiny.get_config().model)
  model = Transformer(cfg)
  params = sharding.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  head = heads.init_scalar_head(cfg.d_model, jax.random.key(1))
  rng = np.random.default_rng(0)
  n, g, P, T = 2, 2, 7, 9
  prompts = [rng.integers(4, cfg.vocab_size, k).tolist() for k in (7, 4)]
  prompt = np.array([[0] * (P - len(p)) + p for p in prompts], np.int32)   # left-padded [n, P]
  r = n * g
  lengths = rng.integers(1, T + 1, r)                                      # right-padded [r, T]
  tokens = np.array([rng.integers(4, cfg.vocab_size, T) * (np.arange(T) < k) for k in lengths], np.int32)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  rows = np.arange(r) // g                                                 # row i answers prompt i // g

  # The reference: prompt + completion as one right-padded row of the plain model, in float64.
  seqs = [prompts[rows[i]] + tokens[i, :lengths[i]].tolist() for i in range(r)]
  L = max(map(len, seqs))
  flat = np.array([s + [0] * (L - len(s)) for s in seqs], np.int32)
  segments = (np.arange(L)[None] < np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
  logits, hidden = model.apply({"params": params}, flat, None, segments, return_hidden=True)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)          # [r, L, V]
  last = np.array([np.asarray(hidden[i, len(seqs[i]) - 1], np.float64) for i in range(r)])
  head_only = last @ np.asarray(head["kernel"], np.float64) + float(head["bias"])   # [r]
  mean_logp = np.array([np.mean([logp[i, t - 1, flat[i, t]] for t in range(len(prompts[rows[i]]), len(seqs[i]))])
                        for i in range(r)])

  score = jax.jit(lambda p, b, g: steps.reward_model_scores(p, cfg, b, g), static_argnums=2)
  for weight, want in ((None, head_only), (0.7, head_only + 0.7 * mean_logp)):
    params["reward_head"] = dict(head, **({} if weight is None else {"logp_weight": jnp.float32(weight)}))
    for groups in (1, g):   # groups == 1: each row its own copy of its prompt
      sel = rows if groups == 1 else np.arange(n)
      batch = {"prompt": prompt[sel], "prompt_mask": (prompt[sel] > 0).astype(np.int32), "tokens": tokens,
               "mask": mask}
      np.testing.assert_allclose(score(params, batch, groups), want, rtol=1e-4, atol=1e-4)
