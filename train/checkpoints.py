"""A run's checkpoint folder kept sound: saves that fail stop the run, and a resume or a reader
takes the newest step that restores completely.

- `Manager`: orbax's CheckpointManager, plus the checksums of every step it commits
  (train/checksums.py) and a failed save (disk full, no permission) raised as a UserError naming
  the path and the last good step, from `check()` at the latest: the loop calls it every step.
- `newest_that_restores`: steps newest first, each checked against its checksums (by process 0;
  every process takes its verdict) and then restored; the first that restores wins.
- `set_aside`: bad steps go to DIR/checkpoints-corrupt/<step>-<reason> (never deleted).

orbax logs pages of TensorStore context per failed save or restore; they are dropped here (the
errors above say it in one line), unless KILN_DEBUG=1.
"""
import contextlib
import logging
import os
import re

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from configs.errors import UserError
from train import checksums, files


class _QuietOrbaxErrors(logging.Filter):
  """Drops orbax's error records (a failed save or restore is raised or named in one line here)."""

  def filter(self, record):
    return (record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname
            or bool(os.environ.get("KILN_DEBUG")))


logging.getLogger("absl").addFilter(_QuietOrbaxErrors())

ITEMS = ("params", "opt_state", "meta")


class Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager of DIR/checkpoints with checksums and failed saves raised (above).
  A failed step's partial files stay in orbax's temporary folder; older steps stay as they were."""

  def __init__(self, directory: str, keep: int, async_save: bool):
    super().__init__(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True))
    self._unsummed = []  # steps saved since the last checksums were written
    self._latest_save = None  # the step of the latest save started (the one a late failure is of)

  def save(self, step: int, *args, **kwargs) -> bool:
    self._latest_save = step
    try:
      saved = super().save(step, *args, **kwargs)  # waits for the previous save first
    except UserError:
      raise
    except Exception as e:  # a synchronous save, or the start of an async one
      raise self._failed(step, e) from e
    if saved:
      self._unsummed.append(step)
      if not self.is_saving_in_progress():  # synchronous: committed already
        self._checksum()
    return saved

  def check(self) -> None:
    """Raises the UserError of a background save that failed; writes the checksums of the steps
    committed since the last call. Returns at once while a save is in progress."""
    if not self.is_saving_in_progress():
      self.wait_until_finished()

  def wait_until_finished(self) -> None:
    try:
      super().wait_until_finished()
    except Exception as e:
      raise self._failed(self._latest_save, e) from e
    self._checksum()

  def _checksum(self) -> None:
    steps, self._unsummed = self._unsummed, []
    try:
      for step in steps:
        if jax.process_index() == 0 and files.isdir(self._step_dir(step)):
          checksums.write(self._step_dir(step))
    except OSError as e:
      raise self._failed(step, e) from e

  def _step_dir(self, step: int) -> str:
    return os.path.join(str(self.directory), str(step))

  def _failed(self, step, error: BaseException) -> UserError:
    """The UserError of a failed save of `step`; the manager is closed (one process: the run ends)."""
    self._unsummed = []
    good = [s for s in self.all_steps() if s != step and files.isdir(self._step_dir(s))]
    if jax.process_count() == 1:
      with contextlib.suppress(Exception):
        super().close()  # its background threads, else they outlive the run's end
    last = (f"the last good checkpoint is step {max(good)} in {self.directory}" if good else
            f"no checkpoint of this run is saved in {self.directory}")
    where = self._step_dir(step) if step is not None else self.directory
    return UserError(f"saving checkpoint {where} failed: {first_line(error)}; {last}",
                     hint="free disk space (or fix the folder's permissions) and rerun the same command: "
                          "it resumes from the last good checkpoint")


def first_line(error: BaseException, limit: int = 300) -> str:
  """The innermost cause's first line, or just the OS error when it is one or TensorStore names one
  ("No space left on device (errno 28)" out of a paragraph about the OCDBT database)."""
  while error.__cause__ is not None or (error.__context__ is not None and not str(error)):
    error = error.__cause__ or error.__context__
  if isinstance(error, OSError) and error.errno:  # e.g. the checksums file of a committed step
    return f"{os.strerror(error.errno)} (errno {error.errno})"
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
  return text if len(text) <= limit else text[:limit] + "..."


def agree(ok: bool) -> bool:
  """Process 0's verdict on every process (only process 0 reads the checksums)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.array(ok)))


def newest_that_restores(directory: str, steps, restore_one, skip=()):
  """(step, restore_one(step), bad, verdict) for the newest of `steps` whose files match their
  checksums (or have none: verdict "unverified"; items in `skip` are not checked) and that
  restores; `bad`: [(step, reason, detail, the error or None)] of the newer ones that did not;
  step None if none does. With several processes an error is raised at once (they raise together)."""
  bad = []
  for step in sorted(steps, reverse=True):
    verdict, detail = (checksums.verify(os.path.join(directory, str(step)), skip)
                       if jax.process_index() == 0 else (checksums.OK, ""))
    if not agree(verdict in (checksums.OK, checksums.UNVERIFIED)):
      bad.append((step, verdict, detail, None))
      continue
    try:
      return step, restore_one(step), bad, verdict
    except Exception as e:  # any failure to read it: try the step before
      if jax.process_count() > 1:
        raise
      bad.append((step, "unreadable", first_line(e), e))
  return None, None, bad, ""


def describe(bad) -> str:
  return "; ".join(f"step {b[0]}: {b[2]}" for b in bad)


def none_restores(directory: str, bad) -> UserError:
  return UserError(f"no checkpoint in {directory} restores ({describe(bad)})",
                   hint="if the config changed since these were saved (model shape, optimizer, LoRA), "
                        "rerun with the run's own config.json; a corrupt step is moved to "
                        f"{directory}-corrupt/ when the run resumes")


def set_aside(mngr: ocp.CheckpointManager, reasons: dict) -> dict:
  """Moves each step of `reasons` ({step: reason}) to DIR/checkpoints-corrupt/<step>-<reason>
  (process 0; all processes wait for it) and rereads the step list; returns {step: new path}."""
  if not reasons:
    return {}
  directory = str(mngr.directory)
  where = {s: os.path.join(directory + "-corrupt", f"{s}-{r}") for s, r in reasons.items()}
  if jax.process_index() == 0:
    where = {s: checksums.set_aside(directory, s, r) for s, r in reasons.items()}
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("kiln: checkpoints set aside")
  mngr.reload()
  return where
