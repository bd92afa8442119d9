"""The online RL loop (objective grpo | ppo): rollout -> score -> advantages -> several updates.

One iteration: take the prompts of the iteration (rl/prompts.py), sample G completions each
(rl/rollout.py over model/decode.py), score them (reward functions and/or a reward model, minus a
missing-EOS penalty), compute the reference log-probs and values in one jitted pass, the
advantages (GRPO: group-relative; PPO: per-token rewards with the KL, GAE), then
`num_iterations` passes of `num_minibatches` jitted update steps with pi_old fixed.

Reused from the offline trainer: state setup / resume (train/state.py), checkpoints, optimizer,
metrics, StopFlag. A checkpoint holds the policy (a plain model: eval and `init_from` read it),
its optimizer state and meta = {prompt iterator, KL coefficient, rng}; a separate critic lives in
`workdir/critic/checkpoints`. Rerunning the same command resumes at the next iteration with the
same prompts and samples an uninterrupted run would have seen.
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
from eval.tasks import evaluate_problems
from model import heads, sharding
from model.tokenizer import stop_id
from model.transformer import ModelConfig, Transformer
from rl import config as rl_config, grpo, kl, prompts, rollout, steps, value
from rl.rewards import combined_reward
from train import optim, profile
from train import rundir as checkpoint
from train import state as state_lib
from train.rundir import load_config
from train.loop import StopFlag, start_run
from train.metrics import MetricsLogger
from train.validate import validate

ANSWER_REWARDS = ("answer_match", "numeric_closeness")


def check_config(config) -> dict:
  """train/validate.py on the shared keys, rl/config.py on config.rl; returns the mesh shape."""
  plain = copy.deepcopy(config)
  with plain.unlocked():
    plain.objective = "sft"  # validate knows the offline objectives; rl.config.check knows these
    if "rl" in plain and "rl" not in base.base_config():
      del plain["rl"]
  mesh = validate(plain, jax.device_count(), jax.process_count())
  rl_config.check(config, mesh["data"] * mesh["fsdp"])
  rl_config.check_start(config)
  return mesh


def load_reward_model(path: str, mesh):
  """(params with reward_head, its ModelConfig) of a reward_model run, or (None, None)."""
  if not path:
    return None, None
  cfg = ModelConfig.from_config(load_config(path).model)
  abstract, shardings, _, _ = state_lib.abstract_params(Transformer(cfg), 8, mesh, heads.reward_head_params)
  params, _ = checkpoint.restore_params(path, abstract, shardings)
  return params, cfg


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


@dataclasses.dataclass
class Models:
  """Everything a run starts from: the trained state (policy, optional critic) and frozen models."""
  trainable: Any         # full params (with "value_head" for rl.value_model=policy) or LoRA adapters
  opt_state: Any
  frozen: Any            # the LoRA base (also the reference), else None
  start: int             # iteration to continue from
  meta: dict             # the policy checkpoint's meta (prompts, beta, rng), {} at the start
  critic: Any = None     # rl.value_model=critic: transformer + "value_head", and its optimizer state
  critic_opt: Any = None
  cmngr: Any = None
  ref: Any = None        # the reference's params under full fine-tuning (else frozen or None)
  rm: Any = None         # reward model params (with "reward_head") and its ModelConfig
  rm_cfg: Any = None
  notes: list = dataclasses.field(default_factory=list)  # for the start-up line


def setup_models(config, workdir, model, tx, mesh, mngr) -> Models:
  """Policy state from train/state.setup (resume, init_from, LoRA), then critic, reference, reward model."""
  r = config.rl
  head_on_policy = config.objective == "ppo" and r.value_model == "policy"
  st = state_lib.setup(config, model, tx, mesh, mngr, value.value_head_params if head_on_policy else None)
  m = Models(st.trainable, st.opt_state, st.frozen, st.start, st.meta, notes=[st.source])
  if head_on_policy and m.start == 0:
    m.trainable, copied = value.head_from_reward_model(value.init_from(config), m.trainable)
    m.notes[-1] += f"; value_head = the reward head of {value.init_from(config)}" if copied else ""
  if config.objective == "ppo" and r.value_model == "critic":
    m.cmngr = checkpoint.manager(os.path.join(workdir, "critic"), config.keep_checkpoints,
                                 config.async_checkpoints)
    cst = state_lib.setup(value.critic_config(config), model, tx, mesh, m.cmngr, value.value_head_params)
    if cst.start != m.start:
      raise ValueError(f"{workdir}: the critic's checkpoint is at iteration {cst.start} but the policy's "
                       f"at {m.start}; delete the later one to resume from the earlier")
    m.critic, m.critic_opt = cst.trainable, cst.opt_state
    m.notes.append(f"critic {cst.source}")
    if m.start == 0:
      m.critic, copied = value.head_from_reward_model(value.init_from(config), m.critic)
      m.notes[-1] += "; value_head = its reward head" if copied else ""
  if rl_config.needs_reference(config):
    if m.frozen is None:
      abs_params, param_sh, _, _ = state_lib.abstract_params(model, config.seq_len, mesh)
      m.ref, _ = checkpoint.restore_params(config.init_from, abs_params, param_sh)
    m.notes.append("reference: the frozen LoRA base" if m.frozen is not None else
                   f"reference: frozen copy of {config.init_from}")
  m.rm, m.rm_cfg = load_reward_model(r.reward_model, mesh)
  if m.rm is not None:
    m.notes.append(f"reward model {r.reward_model}")
  return m


def train(config, workdir: str) -> dict:
  """Runs (or resumes) a grpo / ppo stage in `workdir`; returns the last metrics."""
  run = start_run(config, workdir, check_config)
  config, mesh_shape, mesh, tok, model_cfg, model, mngr = (
      run.config, run.mesh_shape, run.mesh, run.tokenizer, run.model_cfg, run.model, run.mngr)
  r = config.rl
  is_main = jax.process_index() == 0
  template = config.data.chat_template
  stops = (stop_id(tok, template), tok.eos_id)
  g, n_prompts = r.num_generations, rl_config.num_prompts(config)
  updates_per_iter = r.num_iterations * r.num_minibatches
  tx, lr_fn = optim.make_optimizer(config.optim, config.steps * updates_per_iter)
  lora_cfg = config.lora if state_lib.lora_enabled(config) else None
  weights = rl_config.reward_weights(config)
  use_ref = rl_config.needs_reference(config)

  with sharding.use_mesh(mesh):
    ms = setup_models(config, workdir, model, tx, mesh, mngr)
    trainable, opt_state, frozen, start, meta = ms.trainable, ms.opt_state, ms.frozen, ms.start, ms.meta
    critic, critic_opt, cmngr, ref, rm = ms.critic, ms.critic_opt, ms.cmngr, ms.ref, ms.rm
    source = prompts.make_source(config, need_answer=any(k in weights for k in ANSWER_REWARDS))
    eval_problems = prompts.heldout_problems(config) if r.num_eval_problems else []
    kl_state = kl.init_kl_controller(r.beta if use_ref else 0.0, r.kl_target or None, r.kl_horizon)
    key = jax.random.key(config.seed)
    if meta:
      source.set_state(meta["prompts"])
      kl_state["beta"] = jnp.float32(meta["beta"])
      key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))

    # pi_old before the first update is only needed when the update can't take it from its own
    # forward pass (several minibatches) or the KL goes into the rewards.
    need_old = r.num_minibatches > 1 or (use_ref and rl_config.placement(config) == "in_reward")
    critic_cfg = model_cfg if critic is not None else None
    score_fn = jax.jit(steps.make_score_fn(model_cfg, config, lora_cfg, old=need_old, ref=use_ref,
                                           critic_cfg=critic_cfg, rm_cfg=ms.rm_cfg))
    update = jax.jit(steps.make_update_step(model_cfg, config, tx, lr_fn, lora_cfg, critic_cfg),
                     donate_argnums=(0, 1, 2, 3))
    merged = jax.jit(lambda t, f: state_lib.to_params(t, f, lora_cfg))
    merge = lambda t, f: t if f is None else merged(t, f)  # the policy's params for sampling / eval
    advantages = jax.jit(lambda s, b, beta: (steps.grpo_advantages(config, s, b, beta),)
                         if config.objective == "grpo" else steps.ppo_advantages(config, s, b, beta))
    seq_kl = jax.jit(lambda b: jnp.mean(jnp.sum(steps.rollout_kl(b, r.kl_estimator), -1)))

    log = MetricsLogger(workdir, config.steps, start, enabled=is_main)
    log.write(f"kiln: {config.objective} | {model_cfg.num_params() / 1e6:.2f}M params | mesh {mesh_shape} | "
              f"{n_prompts} prompts x {g} completions, {updates_per_iter} updates per iteration | "
              + " | ".join(ms.notes + [source.describe()]))

    def evaluate(step):
      if not eval_problems:
        return {}
      res = evaluate_problems(merge(trainable, frozen), model_cfg, tok, eval_problems, chat=True, mesh=mesh,
                              max_new_tokens=r.max_new_tokens, template=template, seed=config.seed)
      out = {"eval/accuracy": res["accuracy"], "eval/format": res["format"], "eval/length": res["length"]}
      log.log(step, out)
      for ex in res["examples"][:2]:
        log.write(f"  Q: {ex['question']}\n     model: {ex['completion']!r} (answer {ex['answer']})")
      return out

    def save(step):
      m = {"step": step, "prompts": source.get_state(), "beta": float(kl_state["beta"]),
           "rng": np.asarray(jax.random.key_data(key)).tolist(), **state_lib.checkpoint_meta(config)}
      if cmngr is not None:
        checkpoint.save(cmngr, step, critic, critic_opt, {"step": step}, force=True)
      checkpoint.save(mngr, step, trainable, opt_state, m, force=True)

    if start >= config.steps:
      log.write(f"already finished: iteration {start} >= config.steps={config.steps}")
    last, window = {}, []
    if start == 0 and r.eval_at_start and config.steps > 0:
      last.update(evaluate(0))
    step = start
    prof = profile.StepProfiler(config, workdir, log.write)
    with StopFlag() as stop:
      while step < config.steps:
        prof.before(step)
        t0 = time.perf_counter()
        batch_prompts = source.next()
        key, k_sample, k_shuffle = jax.random.split(key, 3)
        ptoks, pmask = prompts.encode(tok, batch_prompts, template, r.max_prompt_len)   # [n, P]
        gen = rollout.sample(merge(trainable, frozen), model_cfg, ptoks, pmask, k_sample, g,
                             max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                             top_p=r.top_p, stop_ids=stops, pad_id=tok.pad_id, mesh=mesh)
        lengths = rollout.to_host(gen.lengths)                                            # [R]
        width = rollout.bucket(lengths, r.max_new_tokens)
        toks = rollout.to_host(gen.tokens)[:, :width]                                     # [R, T]
        cmask = rollout.to_host(gen.mask)[:, :width]
        t_gen = time.perf_counter() - t0

        texts = completion_texts(tok, toks, lengths, stops)
        answers = [p.answer for p in batch_prompts for _ in range(g)]
        scores, per_fn = combined_reward(weights, texts, answers, lengths, r.max_new_tokens)
        stopped = np.array([n > 0 and row[n - 1] in stops for row, n in zip(toks, lengths)])
        batch = {"prompt": rollout.put(ptoks, mesh, sharded=False),
                 "prompt_mask": rollout.put(pmask, mesh, sharded=False),
                 "tokens": rollout.put(toks, mesh), "mask": rollout.put(cmask, mesh)}
        batch.update(score_fn(trainable, frozen, ref, critic, rm, batch))
        if rm is not None:
          per_fn["reward_model"] = rollout.to_host(batch.pop("rm_score"))
          scores = scores + np.float32(r.reward_model_weight) * per_fn["reward_model"]
        scores = (scores - r.missing_eos_penalty * (~stopped)).astype(np.float32)
        beta = kl_state["beta"]
        adv = advantages(rollout.put(scores, mesh), batch, beta)
        batch["advantages"] = adv[0]
        if config.objective == "ppo":
          batch["old_values"], batch["returns"] = batch.pop("values"), adv[1]
        host = {k: rollout.to_host(v) for k, v in batch.items()}
        t_score = time.perf_counter() - t0 - t_gen

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
        step += 1
        prof.after(step, (trainable, critic))

        m = {f"train/{k}": float(np.mean([x[k] for x in metrics])) for k in metrics[0]}
        if not np.isfinite(m["train/loss"]):
          mngr.wait_until_finished()
          raise FloatingPointError(
              f"train/loss is {m['train/loss']} at iteration {step}; stopping. The last good checkpoint "
              f"is iteration {mngr.latest_step()} in {os.path.join(workdir, 'checkpoints')}")
        if use_ref:
          observed = float(seq_kl({k: jnp.asarray(host[k]) for k in ("old_logp", "ref_logp", "mask")}))
          m["train/kl_per_completion"] = observed
          if rl_config.placement(config) == "in_reward":
            m["train/non_score_reward"] = -float(beta) * observed
          kl_state = kl.update_kl_controller(kl_state, observed, len(scores))
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
        window.append(m)
        if is_main and r.num_samples_to_log:
          with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
            for i in range(0, min(len(texts), r.num_samples_to_log * g), g):
              f.write(json.dumps({"step": step, "prompt": batch_prompts[i // g].messages[-1]["content"],
                                  "completion": texts[i], "reward": float(scores[i])}) + "\n")
        log.advance(step)
        must_save = step % config.checkpoint_every == 0 or step == config.steps
        stopping = stop.agreed()
        if step % config.log_every == 0 or must_save or stopping:
          last = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
          log.log(step, last)
          window = []
        if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
          last.update(evaluate(step))
          log.write(f"  sample (reward {scores[0]:.2f}): {texts[0]!r}")
        if must_save or stopping:
          save(step)
        if stopping:
          log.write(f"stop requested: saved iteration {step}; rerun the same command to resume")
          break
    prof.close()
    for mg in (mngr, cmngr):
      if mg is not None:
        mg.wait_until_finished()
        mg.close()
    log.close()
  last["step"] = step
  return last
