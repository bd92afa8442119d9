"""The offline trainer: sharded init or resume, jitted step, eval, metrics, checkpoints.

One loop serves every offline stage; `config.objective` picks the loss (train/objectives.py).
State is two pytrees (params, opt_state) sharded by the logical rules of model/sharding.py.
"""
import functools
import math
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import sharding
from model.transformer import ModelConfig, Transformer
from train import checkpoint, data, objectives, optim
from train import state as state_lib
from train.metrics import MetricsLogger
from train.validate import validate

# Dense peak FLOP/s per device by device kind (bf16 on accelerators, fp32 on CPU), for MFU.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5p": 459e12, "v5 lite": 197e12,
              "v5e": 197e12, "v4": 275e12, "v6": 918e12, "cpu": 196e9}


def peak_flops(config) -> float:
  if config.peak_flops_per_device > 0:
    return config.peak_flops_per_device
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return PEAK_FLOPS["cpu"] if jax.default_backend() == "cpu" else 0.0


class StopFlag:
  """Set by SIGTERM / SIGINT: the loop saves a checkpoint and exits. A second Ctrl-C kills."""

  def __init__(self):
    self.set = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, _frame):
    if self.set and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.set = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def agreed(self) -> bool:
    """True if any process was asked to stop (all processes must save together)."""
    if jax.process_count() == 1:
      return self.set
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([self.set]))))


def make_train_step(model, objective, tx, lr_fn, accum: int, lora_cfg=None):
  """(trainable, opt_state, batch, step, frozen) -> (trainable, opt_state, metrics).

  `trainable` is the full params (frozen=None) or LoRA adapters over the frozen base.
  Gradient accumulation is exact: sums over micro-batches, divided once by the total weight.
  """

  def grads_of(params, batch, frozen):
    def f(p):
      num, den, sums = objective.loss(state_lib.to_params(p, frozen, lora_cfg), batch, model)
      return num, (den, sums)
    (num, (den, sums)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return num, den, sums, grads

  def step(params, opt_state, batch, step, frozen=None):
    if accum == 1:
      num, den, sums, grads = grads_of(params, batch, frozen)
    else:
      # Micro-batch j takes rows j, j + accum, ... so each one stays spread over all devices.
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)
      def body(carry, mb):
        out = grads_of(params, mb, frozen)
        return jax.tree.map(jnp.add, carry, out), None
      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params, first, frozen))
      (num, den, sums, grads), _ = jax.lax.scan(body, zeros, micro)
    den = jnp.maximum(den, 1.0)
    grads = jax.tree.map(lambda g: g / den, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"train/loss": num / den, "train/grad_norm": optax.tree.norm(grads),
               "train/lr": lr_fn(step), "train/tokens": den}
    metrics.update({f"train/{k}": v / den for k, v in sums.items()})
    return params, opt_state, metrics

  return step


def evaluate(eval_fn, batches, mesh) -> dict:
  """Exact held-out loss and perplexity: sums over all batches, divided once."""
  num = den = 0.0
  sums = {}
  for b in batches:
    n, d, s = jax.device_get(eval_fn(sharding.put_batch(b, mesh)))
    num, den = num + float(n), den + float(d)
    for k, v in s.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  den = max(den, 1.0)
  loss = num / den
  out = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
  out.update({f"eval/{k}": v / den for k, v in sums.items()})
  return out


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the stage described by `config` in `workdir`; returns the last metrics."""
  mesh_shape = validate(config, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))

  mesh = sharding.make_mesh(config.mesh)
  tokenizer = data.load_or_train_tokenizer(config)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size} ids")
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg)
  objective = objectives.get(config.objective)
  tx, lr_fn = optim.make_optimizer(config.optim, config.steps)

  mngr = checkpoint.manager(workdir, config.keep_checkpoints, config.async_checkpoints)
  lora_cfg = config.lora if state_lib.lora_enabled(config) else None
  with sharding.use_mesh(mesh):
    st = state_lib.setup(config, model, tx, mesh, mngr)
    params, opt_state, frozen, meta, start = st.trainable, st.opt_state, st.frozen, st.meta, st.start
    n_params = model_cfg.num_params()
    n_train = sum(x.size for x in jax.tree.leaves(params))
    train_step = jax.jit(make_train_step(model, objective, tx, lr_fn, config.optim.grad_accum, lora_cfg),
                         out_shardings=(st.trainable_shardings, st.opt_shardings, None),
                         donate_argnums=(0, 1))
    eval_step = jax.jit(lambda p, f, b: objective.loss(state_lib.to_params(p, f, lora_cfg), b, model))

    pidx, pcount = jax.process_index(), jax.process_count()
    train_iter = data.make_batch_iterator(config, tokenizer, "train", pidx, pcount)
    if meta.get("data") is not None:
      train_iter.set_state(meta["data"])
    eval_batches = list(data.make_eval_batches(config, tokenizer, pidx, pcount,
                                               max_batches=config.eval_batches or None))

    log = MetricsLogger(workdir, config.steps, start, enabled=is_main)
    log.write(f"kiln: {config.objective} | {n_params / 1e6:.2f}M params, {n_train / 1e6:.3f}M trainable "
              f"| mesh {mesh_shape} | {jax.device_count()} {jax.default_backend()} devices x {pcount} "
              f"processes | {st.source}")
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_token = model_cfg.train_flops_per_token(config.seq_len)
    peak = peak_flops(config)

    def save(step):
      meta = {"step": step, "data": train_iter.get_state(), **state_lib.checkpoint_meta(config)}
      checkpoint.save(mngr, step, params, opt_state, meta, force=True)

    if start >= config.steps:
      log.write(f"already finished: step {start} >= config.steps={config.steps} "
                f"(raise --config.steps to train on)")
    last, window, times, pending = {}, [], [], None
    t_last = None
    step = start
    with StopFlag() as stop:
      while step < config.steps:
        batch = sharding.put_batch(next(train_iter), mesh)
        params, opt_state, metrics = train_step(params, opt_state, batch, jnp.int32(step), frozen)
        step += 1
        done = [pending] if pending else []
        pending = (step, metrics)
        must_save = step % config.checkpoint_every == 0 or step == config.steps
        stopping = stop.agreed()
        if must_save or stopping or step % config.log_every == 0:
          done.append(pending)  # sync now: a checkpoint must never hold a NaN state
          pending = None
        for s, m in done:
          m = jax.device_get(m)
          if not np.isfinite(m["train/loss"]):
            mngr.wait_until_finished()
            raise FloatingPointError(
                f"train/loss is {m['train/loss']} at step {s}; stopping. The last good checkpoint "
                f"is step {mngr.latest_step()} in {os.path.join(workdir, 'checkpoints')}")
          now = time.perf_counter()
          window.append(m)
          if t_last is not None:
            times.append(now - t_last)
          t_last = now
          log.advance(s)
          if s % config.log_every == 0:
            last = {k: float(np.mean([w[k] for w in window])) for k in m}
            if times:  # median step time: robust to the odd slow step (checkpoint, GC)
              dt = float(np.median(times))
              tflops = flops_per_token * tokens_per_step / dt / jax.device_count()
              last.update({"train/step_time": dt, "train/tokens_per_sec": tokens_per_step / dt,
                           "train/tflops_per_device": tflops / 1e12,
                           "train/mfu": tflops / peak if peak else 0.0})
            log.log(s, last)
            window, times = [], []
        if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
          ev = evaluate(functools.partial(eval_step, params, frozen), eval_batches, mesh)
          log.log(step, ev)
          last.update(ev)
          t_last = None  # eval time is not train time
        if must_save or stopping:
          save(step)
          t_last = None
        if stopping:
          log.write(f"stop requested: saved step {step}; rerun the same command to resume")
          break
    mngr.wait_until_finished()
    mngr.close()
    log.close()
  last["step"] = step
  return last
