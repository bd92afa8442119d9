"""The online RL trainer (config.objective: an algorithm of rl/algorithms.py: grpo, rloo, gspo, ppo).

One iteration: take the prompts of the iteration (rl/prompts.py), sample G completions each
(rl/rollout.py over model/decode.py), score them (reward functions and/or a reward model, minus a
missing-EOS penalty), compute the sampling policy's and the reference's log-probs and the values
in one jitted pass, the algorithm's advantages (GRPO: group-relative; PPO: per-token rewards with
the KL, GAE), then `num_iterations` passes of `num_minibatches` jitted update steps with pi_old fixed.

An iteration is one step of the loop of train/run_loop.py, which does the bookkeeping of every
stage (stop flag, non-finite guard, logging, checkpoint and eval cadence, profiler). A checkpoint
holds the policy (a plain model: eval and `init_from` read it), its optimizer state and meta =
{prompt iterator, KL coefficient, rng}; a separate critic lives in `workdir/critic/checkpoints`
(rl/models.py). Rerunning the same command resumes at the next iteration with the same prompts
and samples an uninterrupted run would have seen.
"""
import copy
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from model import sharding
from model.tokenizer import stop_id
from rl import algorithms, config as rl_config, grpo, kl, prompts, rollout, steps, value
from rl.accuracy import evaluate_problems
from rl.models import setup_models
from rl.rewards import combined_reward
from train import compiler_options, files, optim, rundir, run_loop
from train import state as state_lib
from train.stage import start_run
from train.validate import validate

ANSWER_REWARDS = ("answer_match", "numeric_closeness")


def check_config(config, num_devices=None, num_processes=None, launch: bool = True) -> dict:
  """train/validate.py on the shared keys, rl/config.py on config.rl (with `launch`, what only a run
  needs: init_from); returns the mesh shape (for num_devices over num_processes: by default this run's)."""
  plain = copy.deepcopy(config)
  with plain.unlocked():
    plain.objective = "sft"  # validate knows the offline objectives; rl.config.check knows these
    if "rl" in plain and "rl" not in base.base_config():
      del plain["rl"]
  mesh = validate(plain, num_devices or jax.device_count(), num_processes or jax.process_count())
  rl_config.check(config, mesh["data"] * mesh["fsdp"])
  if launch:
    rl_config.check_start(config)
  return mesh


def completion_texts(tok, tokens, lengths, stops) -> list:
  out = []
  for row, n in zip(tokens, lengths):
    ids = list(row[:n])
    out.append(tok.decode(ids[:-1] if ids and ids[-1] in stops else ids))
  return out


def minibatches(batch: dict, n_prompts: int, g: int, k: int, rng):
  """Splits a host batch into k minibatches of whole groups, prompts shuffled by rng (if k > 1)."""
  order = rng.permutation(n_prompts) if k > 1 else np.arange(n_prompts)
  for part in np.split(order, k):
    rows = (part[:, None] * g + np.arange(g)).reshape(-1)
    yield {key: v[part] if key.startswith("prompt") else v[rows] for key, v in batch.items()}


def _stats(prefix: str, x) -> dict:
  return {f"{prefix}/mean": float(np.mean(x)), f"{prefix}/std": float(np.std(x))}


@dataclasses.dataclass(frozen=True)
class Learner:
  """What one iteration changes (and a checkpoint keeps): the trained params and optimizer states,
  the KL controller, the rng."""
  trainable: Any     # full params or LoRA adapters
  opt_state: Any
  critic: Any        # rl.value_model=critic: the critic's params and optimizer state, else None
  critic_opt: Any
  kl: dict           # rl/kl.py controller state
  key: Any


def train(config, workdir: str) -> dict:
  """Runs (or resumes) an online RL stage in `workdir`; returns the last metrics."""
  run = start_run(config, workdir, check_config)
  config, mesh_shape, mesh, tok, model_cfg, model, mngr = (
      run.config, run.mesh_shape, run.mesh, run.tokenizer, run.model_cfg, run.model, run.mngr)
  r = config.rl
  algo = algorithms.get(config.objective)
  is_main = jax.process_index() == 0
  template = config.data.chat_template
  stops = (stop_id(tok, template), tok.eos_id)
  g, n_prompts = r.num_generations, rl_config.num_prompts(config)
  updates_per_iter = r.num_iterations * r.num_minibatches
  tx, lr_fn = optim.make_optimizer(config.optim, config.steps * updates_per_iter)
  critic_tx, _ = value.critic_optimizer(config, config.steps * updates_per_iter)
  lora_cfg = config.lora if state_lib.lora_enabled(config) else None
  weights = rl_config.reward_weights(config)
  use_ref = rl_config.needs_reference(config)
  kl_in_reward = use_ref and algorithms.kl_placement(config) == "in_reward"

  with sharding.use_mesh(mesh):
    ms = setup_models(config, workdir, model, tx, mesh, mngr, critic_tx)
    frozen, start, meta, cmngr, ref, rm = ms.frozen, ms.start, ms.meta, ms.cmngr, ms.ref, ms.rm
    source = prompts.make_source(config, any(k in weights for k in ANSWER_REWARDS), tok)
    eval_problems = prompts.heldout_problems(config) if r.num_eval_problems else []
    kl_state = kl.init_kl_controller(r.beta if use_ref else 0.0, r.kl_target or None, r.kl_horizon)
    key = jax.random.key(config.seed)
    if meta:
      source.set_state(meta["prompts"])
      kl_state["beta"] = jnp.float32(meta["beta"])
      key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))

    # pi_old before the first update is only needed when the update can't take it from its own
    # forward pass (several minibatches) or the KL goes into the rewards.
    need_old = r.num_minibatches > 1 or kl_in_reward
    critic_cfg = model_cfg if ms.critic is not None else None
    score_fn = jax.jit(steps.make_score_fn(model_cfg, config, lora_cfg, old=need_old, ref=use_ref,
                                           critic_cfg=critic_cfg, rm_cfg=ms.rm_cfg))
    update = jax.jit(steps.make_update_step(model_cfg, config, tx, lr_fn, lora_cfg, critic_cfg, critic_tx),
                     donate_argnums=(0, 1, 2, 3),  # the FSDP overlap options, as the offline step's
                     compiler_options=compiler_options.for_platform(config.compiler_options,
                                                                    jax.default_backend()))
    # The policy's params for sampling / eval: under LoRA the base with the adapters next to their
    # kernels (applied unmerged, no merged copy of the model).
    policy = lambda t: state_lib.to_params(t, frozen, lora_cfg)
    advantages = jax.jit(lambda s, b, beta: algo.advantages(config, s, b, beta))
    seq_kl = jax.jit(lambda b: jnp.mean(jnp.sum(algorithms.rollout_kl(b, r.kl_estimator), -1)))

    log = run_loop.open_log(config, workdir, start)
    log.write(f"kiln: {config.objective} | {model_cfg.num_params() / 1e6:.2f}M params | mesh {mesh_shape} | "
              f"{n_prompts} prompts x {g} completions, {updates_per_iter} updates per iteration | "
              + " | ".join(ms.notes + [source.describe(), run.tokenizer_note]))
    if warning := source.warning():
      log.write(warning)
    shown = {}  # the first completion of the latest iteration, for the console at eval steps

    def iteration(state, step):
      """Rollout, scoring, advantages and the updates of iteration step + 1."""
      t0 = time.perf_counter()
      batch_prompts = source.next()
      key, k_sample, k_shuffle = jax.random.split(state.key, 3)
      ptoks, pmask = prompts.encode(tok, batch_prompts, template, r.max_prompt_len)   # [n, P]
      gen = rollout.sample(policy(state.trainable), model_cfg, ptoks, pmask, k_sample, g,
                           max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                           top_p=r.top_p, stop_ids=stops, pad_id=tok.pad_id, mesh=mesh)
      lengths = rollout.to_host(gen.lengths)                                            # [R]
      toks, cmask = rollout.to_host(gen.tokens), rollout.to_host(gen.mask)              # [R, max_new]
      t_gen = time.perf_counter() - t0

      texts = completion_texts(tok, toks, lengths, stops)
      answers = [p.answer for p in batch_prompts for _ in range(g)]
      scores, per_fn = combined_reward(weights, texts, answers, lengths, r.max_new_tokens)
      stopped = np.array([n > 0 and row[n - 1] in stops for row, n in zip(toks, lengths)])
      sampled = {}  # rl.oversample: the reward of every sampled completion (the policy's), not the picked
      if len(batch_prompts) > n_prompts:
        pool = (scores - r.missing_eos_penalty * (~stopped)).astype(np.float32)        # [R']
        keep = grpo.spread_first(pool, g, n_prompts)                                    # [n]
        rows = (keep[:, None] * g + np.arange(g)).reshape(-1)                           # [R]
        ptoks, pmask = ptoks[keep], pmask[keep]
        toks, cmask, lengths, scores, stopped = (x[rows] for x in (toks, cmask, lengths, scores, stopped))
        per_fn = {k: np.asarray(v)[rows] for k, v in per_fn.items()}
        texts, batch_prompts = [texts[i] for i in rows], [batch_prompts[i] for i in keep]
        sampled = {"train/reward": float(np.mean(pool)), "train/reward_std": float(np.std(pool)),
                   "train/zero_spread_fraction": float(grpo.zero_spread_fraction(pool, g)),
                   "train/picked_zero_spread_fraction": float(grpo.zero_spread_fraction(scores, g))}
      width = rollout.bucket(lengths, r.max_new_tokens)
      toks, cmask = toks[:, :width], cmask[:, :width]                                   # [R, T]
      batch = {"prompt": rollout.put(ptoks, mesh, sharded=False),
               "prompt_mask": rollout.put(pmask, mesh, sharded=False),
               "tokens": rollout.put(toks, mesh), "mask": rollout.put(cmask, mesh)}
      batch.update(score_fn(state.trainable, frozen, ref, state.critic, rm, batch))
      if rm is not None:
        per_fn["reward_model"] = rollout.to_host(batch.pop("rm_score"))
        scores = scores + np.float32(r.reward_model_weight) * per_fn["reward_model"]
      scores = (scores - r.missing_eos_penalty * (~stopped)).astype(np.float32)
      beta = state.kl["beta"]
      batch.update(advantages(rollout.put(scores, mesh), batch, beta))
      host = {k: rollout.to_host(v) for k, v in batch.items()}
      t_score = time.perf_counter() - t0 - t_gen

      trainable, opt_state, critic, critic_opt = (state.trainable, state.opt_state, state.critic,
                                                  state.critic_opt)
      metrics = []
      shuffle = np.random.default_rng(np.asarray(jax.random.key_data(k_shuffle)))
      for _ in range(r.num_iterations):
        for mb in minibatches(host, n_prompts, g, r.num_minibatches, shuffle):
          mb = {k: rollout.put(v, mesh, sharded=not k.startswith("prompt")) for k, v in mb.items()}
          count = jnp.int32(step * updates_per_iter + len(metrics))
          trainable, opt_state, critic, critic_opt, logp, m = update(
              trainable, opt_state, critic, critic_opt, frozen, mb, beta, count)
          metrics.append(m)
          if "old_logp" not in host:  # one minibatch: this pass's own log-probs are pi_old
            host["old_logp"] = rollout.to_host(logp)
      metrics = jax.device_get(metrics)
      t_update = time.perf_counter() - t0 - t_gen - t_score

      m = {f"train/{k}": float(np.mean([x[k] for x in metrics])) for k in metrics[0]}
      kl_next = state.kl
      if use_ref:
        observed = float(seq_kl({k: jnp.asarray(host[k]) for k in ("old_logp", "ref_logp", "mask")}))
        m["train/kl_per_completion"] = observed
        if kl_in_reward:
          m["train/non_score_reward"] = -float(beta) * observed
        if np.isfinite(observed):  # not from the log-probs of non-finite params
          kl_next = kl.update_kl_controller(state.kl, observed, len(scores))
      real_tokens = int(pmask.sum()) * g + int(lengths.sum())
      m.update({"train/reward": float(np.mean(scores)), "train/reward_std": float(np.std(scores)),
                "train/beta": float(beta), "train/completion_length": float(np.mean(lengths)),
                "train/stopped_fraction": float(np.mean(stopped)),
                "train/tokens_per_sec": (r.num_iterations + 1) * real_tokens / (time.perf_counter() - t0),
                "train/rollout_tokens_per_sec": float(lengths.sum()) / t_gen,
                "train/update_tokens_per_sec": r.num_iterations * real_tokens / t_update,
                "train/generate_time": t_gen, "train/score_time": t_score, "train/update_time": t_update,
                "train/iteration_time": time.perf_counter() - t0})
      for name, x in per_fn.items():
        m.update(_stats(f"train/rewards/{name}", x))
      if g > 1:
        m["train/zero_spread_fraction"] = float(grpo.zero_spread_fraction(scores, g))
      m.update(sampled)
      if is_main and r.num_samples_to_log:
        with files.Appender(os.path.join(workdir, "samples.jsonl")) as f:
          for i in range(0, min(len(texts), r.num_samples_to_log * g), g):
            f.write(json.dumps({"step": step + 1, "prompt": batch_prompts[i // g].messages[-1]["content"],
                                "completion": texts[i], "reward": float(scores[i])}) + "\n")
      shown.update(text=texts[0], reward=float(scores[0]))
      return Learner(trainable, opt_state, critic, critic_opt, kl_next, key), m

    def evaluate(state, step):
      """Greedy held-out accuracy (rl.num_eval_problems), and the latest iteration's first sample."""
      out = {}
      if eval_problems:
        res = evaluate_problems(policy(state.trainable), model_cfg, tok, eval_problems, chat=True,
                                mesh=mesh, max_new_tokens=r.max_new_tokens, template=template,
                                seed=config.seed)
        out = {"eval/accuracy": res["accuracy"], "eval/format": res["format"], "eval/length": res["length"]}
        log.log(step, out)
        for ex in res["examples"][:2]:
          log.write(f"  Q: {ex['question']}\n     model: {ex['completion']!r} (answer {ex['answer']})")
      if shown:
        log.write(f"  sample (reward {shown['reward']:.2f}): {shown['text']!r}")
      return out

    def save(state, step):
      m = {"step": step, "prompts": source.get_state(), "beta": float(state.kl["beta"]),
           "rng": np.asarray(jax.random.key_data(state.key)).tolist(), **state_lib.checkpoint_meta(config)}
      if cmngr is not None:
        rundir.save(cmngr, step, state.critic, state.critic_opt, {"step": step}, force=True)
      rundir.save(mngr, step, state.trainable, state.opt_state, m, force=True)

    loop_steps = run_loop.Steps(iteration, save, evaluate, unit="iteration", overlap=False,
                                eval_at_start=r.eval_at_start,
                                arrays=lambda s: (s.trainable, s.opt_state, s.critic, s.critic_opt))
    learner = Learner(ms.trainable, ms.opt_state, ms.critic, ms.critic_opt, kl_state, key)
    managers = [mngr] if cmngr is None else [mngr, cmngr]
    return run_loop.run(loop_steps, learner, start, config, workdir, log, managers)
