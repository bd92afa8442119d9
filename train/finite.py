"""Non-finite updates never reach the weights: the guard inside every jitted update step, and the
check of a state before it is checkpointed.

An update is applied only if its loss and gradient norm are finite; otherwise the step returns the
params and optimizer state it was given, bit for bit (`apply_if`), and reports `skipped` = 1 (the
loop of train/run_loop.py counts and logs those, and stops after too many in a row). No counter lives in
the optimizer state, so the checkpoint layout is the same with or without the guard.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs.errors import UserError
from train import checkpoints


# What the update steps check, as the loop reads it (an RL iteration: means over its updates).
CHECKED = ("train/loss", "train/grad_norm", "train/critic_grad_norm")


def update_ok(*scalars):
  """True (a traced bool) if every scalar (loss, gradient norms) is finite."""
  ok = jnp.bool_(True)
  for x in scalars:
    ok = ok & jnp.isfinite(x)
  return ok


def apply_if(ok, update, state):
  """update(state) if `ok`, else `state` bit for bit. A lax.cond, not a select per leaf: a skipped
  update is not computed, and donated buffers are updated in place (a select per leaf cost extra copies)."""
  return jax.lax.cond(ok, update, lambda s: s, state)


@jax.jit
def all_finite(tree):
  """True if every leaf of `tree` is finite (integer leaves always are): one scalar on device."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def is_skipped(metrics: dict) -> bool:
  """Whether a step (its metrics read back) counts as non-finite: train/skipped > 0 (its update was
  not applied), or, from a step without the guard, a non-finite train/loss."""
  if "train/skipped" in metrics:
    return metrics["train/skipped"] > 0
  return not np.isfinite(metrics["train/loss"])


def describe(metrics: dict) -> str:
  """The non-finite quantities the guard checks of a skipped step: 'train/loss nan, train/grad_norm nan'."""
  bad = [f"{k} {metrics[k]}" for k in CHECKED if k in metrics and not np.isfinite(metrics[k])]
  return ", ".join(bad) or f"train/skipped {metrics.get('train/skipped')}"


def last_good(mngr, unit: str, workdir: str) -> str:
  """'the last good checkpoint is step N in DIR/checkpoints', or that there is none yet."""
  mngr.wait_until_finished()
  latest = mngr.latest_step()
  if latest is None:
    return "there is no checkpoint yet"
  return f"the last good checkpoint is {unit} {latest} in {os.path.join(workdir, 'checkpoints')}"


class Streak:
  """Skipped steps in a row, as the loop reads their metrics: each one is logged, and more than
  `limit` in a row stop the run (`stop`)."""

  def __init__(self, limit: int, unit: str, write):
    self.limit, self.unit, self.write = limit, unit, write
    self.first, self.count = None, 0  # the first step of the current streak, its length

  def read(self, metrics: dict, step: int) -> bool:
    """Counts step `step` (skipped or not); returns True if the run must stop."""
    if not is_skipped(metrics):
      self.first, self.count = None, 0
      return False
    self.first, self.count = self.first or step, self.count + 1
    self.write(f"{self.unit} {step}: non-finite {describe(metrics)}: update skipped ({self.count} in a "
               f"row; more than config.max_nonfinite_steps={self.limit} stop the run)")
    return self.count > self.limit

  def stop(self, managers, start: int, workdir: str, step: int) -> UserError:
    """The error that ends the run. The params of the step before the streak gave every step of it,
    so this run's checkpoints from that step on are moved to DIR/checkpoints-corrupt/<step>-nonfinite
    (if an earlier one is left; nothing is deleted): a rerun resumes from the last checkpoint whose
    params trained on."""
    u, main = self.unit, managers[0]
    for m in managers:
      m.wait_until_finished()
    suspect = [s for s in main.all_steps() if s >= self.first - 1 and s > start]
    removed = suspect if len(suspect) < len(main.all_steps()) else []
    for m in managers:
      checkpoints.set_aside(m, {s: "nonfinite" for s in removed if s in m.all_steps()})
    span = f"{u} {step}" if self.first == step else f"{u}s {self.first}-{step}"
    what = (f"{self.count} non-finite {u}{'s' if self.count > 1 else ''} in a row ({span}), more than "
            f"config.max_nonfinite_steps={self.limit}: stopping")
    if removed:
      what += (f"; moved the checkpoints of {u}s {removed}, whose params gave them, to "
               f"{os.path.join(workdir, 'checkpoints-corrupt')}")
    latest = main.latest_step()
    hint = (f"lower config.optim.lr (or raise config.optim.warmup_steps), or check the data of those "
            f"{u}s; rerunning " + ("starts over" if latest is None else f"resumes from {u} {latest}"))
    if latest is not None and latest >= self.first - 1:  # kept: this run resumed from it, or the only one
      where = os.path.join(workdir, "checkpoints", str(latest))
      return UserError(f"{what}; the latest checkpoint, {where}, holds the params they started from",
                       hint=hint + f"; if that fails again, delete {where} to go back to an earlier one")
    return UserError(f"{what}; {last_good(main, u, workdir)}", hint=hint)
