"""A profiler trace of a few steps of a run: `--config.profile.start_step=N`.

The steps logged as N .. N + profile.num_steps - 1 (numbered from 1 as in the console and
metrics.jsonl; in RL runs a step is one iteration: rollout, scoring, update) are recorded into
DIR/profile/plugins/profile/<time>/: an `.xplane.pb` per process (TensorBoard's profile plugin or
xprof: `tensorboard --logdir DIR/profile`) and a `perfetto_trace.json.gz` that
https://ui.perfetto.dev opens without installing anything. Pick N > 1 (step 1 compiles) and off
eval and checkpoint steps unless those are what you want to see. Every process records its own
devices, so on a pod each host writes its own file. profile.start_step = 0 (the default) records
nothing.
"""
import os

import jax

from configs.errors import UserError


def check(config) -> None:
  """Raises ValueError naming the key if the profile section is invalid."""
  p = config.profile
  if p.start_step < 0:
    raise UserError(f"config.profile.start_step={p.start_step}: use a step number >= 1, or 0 (off)")
  if p.num_steps < 1:
    raise UserError(f"config.profile.num_steps={p.num_steps} must be positive")


class StepProfiler:
  """Starts the trace before step start_step and stops it after step start_step + num_steps - 1
  (or at close()). Steps are counted from 1: step s is the one that makes the counter s."""

  def __init__(self, config, workdir: str, log):
    self.first = config.profile.start_step
    self.last = self.first + config.profile.num_steps - 1
    self.recorded = 0  # the last step run inside the trace
    self.dir = os.path.join(workdir, "profile")
    self.log = log
    self.active = False

  def before(self, done: int) -> None:
    """done: steps completed so far; the next step is done + 1."""
    if self.first and done + 1 == self.first and not self.active:
      jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """step: the step just run; outputs: its results (waited for before the trace stops)."""
    if self.active:
      self.recorded = step
      if step >= self.last:
        jax.block_until_ready(outputs)
        self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      self.log(f"profile of steps {self.first}-{self.recorded} written under {self.dir} "
               f"(tensorboard --logdir {self.dir}, or perfetto_trace.json.gz in ui.perfetto.dev)")
