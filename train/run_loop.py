"""The loop every trainer runs on: the offline one (train/loop.py) and the online RL one (rl/loop.py).

A trainer supplies what differs, as a `Steps` record: how one step turns its state into the next
(and what it measured), how a checkpoint is saved, how the held-out evaluation runs. `run` owns
the rest, the same for every stage:
- the stop flag: SIGTERM / SIGINT (on any process) saves a checkpoint and returns; rerunning the
  command resumes from it;
- the non-finite guard (train/finite.py): a step whose update was skipped on device (a NaN / inf
  loss or gradient: `train/skipped`) is logged, is left out of the logged means but for
  train/skipped, and writes no cadence checkpoint; more than `config.max_nonfinite_steps` in a row
  stop the run with a UserError naming the last good checkpoint. A state is verified finite on
  device before every save (a step's metrics are read before any checkpoint of it is written);
- windowed logging: every log step (and every checkpoint and stop step) writes the mean of the
  metrics since the last write, with the median step time, throughput and MFU when the trainer
  says how many tokens and FLOPs a step is (`Speed`);
- the cadence of checkpoints (every `checkpoint_every` steps, and the last one) and of
  evaluations (every `eval_every` steps, and the last one); a background save that failed (disk
  full) stops the run at the next step, naming the path and the last good checkpoint;
- the progress bar, the profiler (train/profile.py), the "already finished" message, and waiting
  for and closing the checkpoint managers and the logger at the end.
"""
import dataclasses
import signal
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from configs.errors import UserError
from train import finite, profile
from train.metrics import MetricsLogger


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


@dataclasses.dataclass(frozen=True)
class Speed:
  """What turns a step time into throughput and MFU."""
  tokens_per_step: int     # positions processed per step (all devices)
  flops_per_token: float   # training FLOPs per position
  peak_flops: float        # per device; 0 = unknown (MFU reported as 0)

  def metrics(self, step_time: float) -> dict:
    tflops = self.flops_per_token * self.tokens_per_step / step_time / jax.device_count()
    return {"train/step_time": step_time, "train/tokens_per_sec": self.tokens_per_step / step_time,
            "train/tflops_per_device": tflops / 1e12,
            "train/mfu": tflops / self.peak_flops if self.peak_flops else 0.0}


@dataclasses.dataclass(frozen=True)
class Steps:
  """What a trainer hands to `run`: everything else about the loop is the same for all."""
  step: Callable      # (state, steps done) -> (next state, metrics of the step: "train/loss" at least)
  save: Callable      # (state, step) -> None: checkpoint `state`, reached after `step` steps
  evaluate: Callable  # (state, step) -> held-out metrics, written to `log` by the trainer ({} = none)
  unit: str = "step"  # what one step is called in messages ("iteration" in RL)
  speed: Optional[Speed] = None  # None: no step time / throughput / MFU (the step logs its own)
  # True: a step's metrics are read when the next step has been dispatched (so the host prepares
  # step s + 1 while the device runs step s), at once on log / checkpoint / stop steps. False: at
  # once always (a step that waits for its own results anyway, like an RL iteration).
  overlap: bool = True
  eval_at_start: bool = False  # also evaluate before the first step of a fresh run (the baseline)
  arrays: Callable = lambda state: state  # the arrays of `state` a checkpoint holds (verified finite)


def open_log(config, workdir: str, start: int) -> MetricsLogger:
  """The run's logger (progress bar, metrics.jsonl, TensorBoard), written by process 0 only."""
  return MetricsLogger(workdir, config.steps, start, enabled=jax.process_index() == 0)


def _window_mean(window: list) -> dict:
  """Mean of every metric over the steps of the window that have it."""
  keys = dict.fromkeys(k for w in window for k in w)
  return {k: float(np.mean([w[k] for w in window if k in w])) for k in keys}


def _check_saveable(steps: Steps, state, step: int, mngr, workdir: str) -> None:
  """A non-finite state is never saved (the guard makes this unreachable; a trainer without it)."""
  if not bool(finite.all_finite(steps.arrays(state))):
    raise UserError(f"the state after {steps.unit} {step} is not finite: not saved; "
                    f"{finite.last_good(mngr, steps.unit, workdir)}",
                    hint="lower config.optim.lr, or check the data; rerun to resume")


def run(steps: Steps, state: Any, start: int, config, workdir: str, log: MetricsLogger,
        managers: Sequence) -> dict:
  """Runs steps start + 1 .. config.steps (or until stopped); returns the last logged metrics and
  evaluation, with "step": the steps done. `managers`: the run's checkpoint managers, waited for
  and closed at the end; the first is the one the non-finite guard names."""
  unit = steps.unit
  if start >= config.steps:
    log.write(f"already finished: {unit} {start} >= config.steps={config.steps} "
              f"(raise --config.steps to train on)")
  last, window, times, pending = {}, [], [], None
  t_last = None
  if start == 0 and steps.eval_at_start and config.steps > 0:
    last.update(steps.evaluate(state, 0))
  step = start
  prof = profile.StepProfiler(config, workdir, log.write)
  streak = finite.Streak(config.max_nonfinite_steps, unit, log.write)
  with StopFlag() as stop:
    while step < config.steps:
      prof.before(step)
      state, metrics = steps.step(state, step)
      step += 1
      for mngr in managers:  # a background save that failed stops the run here (train/rundir.py)
        mngr.check()
      prof.after(step, metrics)
      done = [pending] if pending else []
      pending = (step, metrics)
      must_save = step % config.checkpoint_every == 0 or step == config.steps
      stopping = stop.agreed()
      if must_save or stopping or step % config.log_every == 0 or not steps.overlap:
        done.append(pending)  # read now: a checkpoint must never hold a non-finite state
        pending = None
      for s, m in done:
        m = jax.device_get(m)
        if streak.read(m, s):
          raise streak.stop(managers, start, workdir, s)
        now = time.perf_counter()
        window.append({k: v for k, v in m.items() if np.isfinite(v)})
        if t_last is not None:
          times.append(now - t_last)
        t_last = now
        log.advance(s)
        if s % config.log_every == 0 or (s == step and (must_save or stopping)):
          last = _window_mean(window)
          if times and steps.speed is not None:  # median: robust to the odd slow step (checkpoint, GC)
            last.update(steps.speed.metrics(float(np.median(times))))
          log.log(s, last)
          window, times = [], []
      if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
        last.update(steps.evaluate(state, step))
        t_last = None  # eval time is not train time
      if stopping or step == config.steps or (must_save and not streak.count):
        _check_saveable(steps, state, step, managers[0], workdir)
        steps.save(state, step)
        t_last = None
      if stopping:
        log.write(f"stop requested: saved {unit} {step}; rerun the same command to resume")
        break
  prof.close()
  for mngr in managers:
    mngr.wait_until_finished()
    mngr.close()
  log.close()
  last["step"] = step
  return last
