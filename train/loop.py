"""The offline trainer: sharded init or resume, the jitted step, held-out evaluation.

It runs on the loop of train/run_loop.py (stop flag, non-finite guard, logging, checkpoint and eval
cadence), supplying one step, a save and an evaluation. One trainer serves every offline stage;
`config.objective` picks the loss (train/objectives.py), and with it the batches (packed rows of
train/data.py, streamed by train/stream.py with data.pipeline=stream, or preference pairs of
train/pairs.py), extra params (a reward head) and a frozen reference model (DPO; train/reference.py).
State is two pytrees (params, opt_state) sharded by the logical rules of model/sharding.py.
"""
import functools
import math
import time

import jax
import jax.numpy as jnp
import optax

from model import sharding
from train import chips, compiler_options, data, finite, objectives, optim, reference, rundir, run_loop, stream
from train import state as state_lib
from train.stage import start_run
from train.validate import validate


@functools.cache
def cpu_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
  """FLOP/s of this host's fastest fp32 matmul: the best of `repeats` [n, n] @ [n, n] (~50 ms).

  A CPU's spec-sheet peak is not knowable from inside a VM (its clock boosts past what
  /proc/cpuinfo says, its vector width differs between boxes of one name), so MFU on a CPU is
  against what XLA's own matmul reaches here (410-450 GFLOP/s on the 2-core AVX-512 EPYC of
  2026-12-02, where a fixed 196 from an older box gave 141% MFU). All host cores serve every
  CPU device, so each one's share is this over the device count."""
  one = jax.sharding.Mesh(jax.local_devices(backend="cpu")[:1], ("host",))
  with jax.set_mesh(one):  # one device, also when called inside a training mesh
    x = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a: a @ a)
    mm(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
      t0 = time.perf_counter()
      mm(x).block_until_ready()
      best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def peak_flops(config) -> float:
  """Peak FLOP/s of one device: config.peak_flops_per_device, its chip's (train/chips.py), or on
  CPU the measured matmul peak shared by the host's CPU devices (0: unknown, no MFU)."""
  if config.peak_flops_per_device > 0:
    return config.peak_flops_per_device
  chip = chips.chip_of(jax.devices()[0].device_kind)
  if chip is not None:
    return chip.peak_flops
  return cpu_matmul_peak() / jax.local_device_count() if jax.default_backend() == "cpu" else 0.0


def make_train_step(model, objective, tx, lr_fn, accum: int, lora_cfg=None, config=None,
                    ref_is_frozen: bool = False):
  """(trainable, opt_state, batch, step, frozen, ref) -> (trainable, opt_state, metrics).

  `trainable` is the full params (frozen=None) or LoRA adapters over the frozen base. `ref` is the
  reference params (or None); with `ref_is_frozen` the reference is the LoRA base `frozen` itself.
  Gradient accumulation is exact: sums over micro-batches, divided once by the total weight.
  A step whose loss or gradient norm is not finite changes nothing (train/finite.py) and reports
  train/skipped = 1.
  """

  def grads_of(params, batch, frozen, ref):
    ctx = objectives.Context(config, frozen if ref_is_frozen else ref)
    def f(p):
      num, den, sums = objective.loss(state_lib.to_params(p, frozen, lora_cfg), batch, model, ctx)
      return num, (den, sums)
    (num, (den, sums)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return num, den, sums, grads

  def step(params, opt_state, batch, step, frozen=None, ref=None):
    if accum == 1:
      num, den, sums, grads = grads_of(params, batch, frozen, ref)
    else:
      # Micro-batch j takes rows j, j + accum, ... so each one stays spread over all devices.
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)
      def body(carry, mb):
        out = grads_of(params, mb, frozen, ref)
        return jax.tree.map(jnp.add, carry, out), None
      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params, first, frozen, ref))
      (num, den, sums, grads), _ = jax.lax.scan(body, zeros, micro)
    den = jnp.maximum(den, 1.0)
    grads = jax.tree.map(lambda g: g / den, grads)
    loss, grad_norm = num / den, optax.tree.norm(grads)

    def update(state):
      params, opt_state = state
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    ok = finite.update_ok(loss, grad_norm)  # else: params and opt_state stay as they were
    params, opt_state = finite.apply_if(ok, update, (params, opt_state))
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/skipped": (~ok).astype(jnp.float32),
               "train/lr": lr_fn(step), f"train/{objective.unit}": den}
    metrics.update({f"train/{k}": v / den for k, v in sums.items()})
    return params, opt_state, metrics

  return step


def evaluate(eval_fn, batches, mesh, perplexity: bool = True) -> dict:
  """Exact held-out loss (and perplexity) and metrics: sums over all batches, divided once."""
  num = den = 0.0
  sums = {}
  for b in batches:
    n, d, s = jax.device_get(eval_fn(sharding.put_batch(b, mesh)))
    num, den = num + float(n), den + float(d)
    for k, v in s.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  den = max(den, 1.0)
  loss = num / den
  out = {"eval/loss": loss}
  if perplexity:
    out["eval/perplexity"] = math.exp(min(loss, 50.0))
  out.update({f"eval/{k}": v / den for k, v in sums.items()})
  return out


def make_batches(config, objective, tokenizer, pidx: int, pcount: int, columns=None):
  """(resumable train iterator, list of eval batches): streamed, the objective's own, or packed rows."""
  columns = columns or {}
  if config.data.pipeline == "stream":
    return (stream.make_batch_iterator(config, tokenizer, pidx, pcount),
            stream.make_eval_batches(config, tokenizer, pidx, pcount))
  if objective.make_batches is not None:
    return (objective.make_batches(config, tokenizer, "train", pidx, pcount, columns.get("train")),
            objective.make_batches(config, tokenizer, "eval", pidx, pcount, columns.get("eval")))
  return (data.make_batch_iterator(config, tokenizer, "train", pidx, pcount),
          list(data.make_eval_batches(config, tokenizer, pidx, pcount, max_batches=config.eval_batches or None)))


def _describe(batches) -> str:
  return batches.describe() if hasattr(batches, "describe") else ""


def _warning(batches) -> str:
  """The iterator's line on training records it dropped, cut or skipped ("" = none)."""
  return batches.warning() if hasattr(batches, "warning") else ""


def _check(config) -> dict:
  mesh_shape = validate(config, jax.device_count(), jax.process_count())
  objectives.get(config.objective).check(config)
  return mesh_shape


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the stage described by `config` in `workdir`; returns the last metrics."""
  run = start_run(config, workdir, _check)
  config, mesh_shape, mesh, tokenizer, model_cfg, model, mngr = (
      run.config, run.mesh_shape, run.mesh, run.tokenizer, run.model_cfg, run.model, run.mngr)
  objective = objectives.get(config.objective)
  tx, lr_fn = optim.make_optimizer(config.optim, config.steps)
  lora_cfg = config.lora if state_lib.lora_enabled(config) else None
  with sharding.use_mesh(mesh):
    st = state_lib.setup(config, model, tx, mesh, mngr, objective.extra_params)
    frozen, meta, start = st.frozen, st.meta, st.start
    n_params = model_cfg.num_params()
    n_train = sum(x.size for x in jax.tree.leaves(st.trainable))
    pidx, pcount = jax.process_index(), jax.process_count()
    ref, columns, ref_note = reference.prepare(config, objective, st, model, mesh, workdir, tokenizer,
                                               pidx, pcount)
    ref_is_frozen = ref is not None and ref is frozen  # LoRA: pass the base once, use it twice
    step_ref = None if ref_is_frozen else ref
    ctx_ref = lambda f, r: f if ref_is_frozen else r
    train_step = jax.jit(make_train_step(model, objective, tx, lr_fn, config.optim.grad_accum, lora_cfg,
                                         config, ref_is_frozen),
                         out_shardings=(st.trainable_shardings, st.opt_shardings, None),
                         donate_argnums=(0, 1),
                         compiler_options=compiler_options.for_platform(config.compiler_options,
                                                                        jax.default_backend()))
    eval_step = jax.jit(lambda p, f, r, b: objective.loss(
        state_lib.to_params(p, f, lora_cfg), b, model, objectives.Context(config, ctx_ref(f, r))))

    train_iter, eval_batches = make_batches(config, objective, tokenizer, pidx, pcount, columns)
    if meta.get("data") is not None:
      train_iter.set_state(meta["data"])

    log = run_loop.open_log(config, workdir, start)
    log.write(f"kiln: {config.objective} | {n_params / 1e6:.2f}M params, {n_train / 1e6:.3f}M trainable "
              f"| mesh {mesh_shape} | {jax.device_count()} {jax.default_backend()} devices x {pcount} "
              f"processes | {st.source}"
              + "".join(f" | {n}" for n in (ref_note, _describe(train_iter), run.tokenizer_note) if n))
    if warning := _warning(train_iter):
      log.write(warning)
    # Pairs: rows [prompt | chosen | rejected]..., and a reference forward (1/3 of a train step).
    rows, row_len = (config.batch_size, config.seq_len) if objective.packed else (train_iter.rows, train_iter.row_len)
    speed = run_loop.Speed(rows * row_len,
                           model_cfg.train_flops_per_token(row_len) * (4 / 3 if ref is not None else 1),
                           peak_flops(config))

    def step(state, done):
      """state: (trainable, opt_state); done: steps so far."""
      batch = sharding.put_batch(next(train_iter), mesh)
      params, opt_state, metrics = train_step(*state, batch, jnp.int32(done), frozen, step_ref)
      return (params, opt_state), metrics

    def save(state, step):
      meta = {"step": step, "data": train_iter.get_state(), **state_lib.checkpoint_meta(config)}
      rundir.save(mngr, step, *state, meta, force=True)

    def evaluate_held_out(state, step):
      ev = evaluate(functools.partial(eval_step, state[0], frozen, step_ref), eval_batches, mesh,
                    perplexity=objective.packed)
      log.log(step, ev)
      return ev

    steps = run_loop.Steps(step, save, evaluate_held_out, speed=speed)
    return run_loop.run(steps, (st.trainable, st.opt_state), start, config, workdir, log, [mngr])
