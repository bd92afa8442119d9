"""The loop skeleton (train/run_loop.py) with a counting step: the cadence of logs, evaluations and
checkpoints, resuming, skipped non-finite steps and the stop after too many, "already finished",
and a stop request."""
import json
import os
import signal
import time

import ml_collections
import numpy as np
import pytest

from configs.errors import UserError
from train import run_loop


class Manager:
  """A checkpoint manager that records what the loop asks of it; each saved step is a directory of
  `directory` (so steps can be moved aside for real)."""

  def __init__(self, directory, saved=()):
    self.directory, self.saved, self.closed = str(directory), [], False
    for s in saved:
      self.save(s)

  def save(self, step):
    os.makedirs(os.path.join(self.directory, str(step)), exist_ok=True)
    self.saved.append(step)

  def reload(self):
    self.saved = [s for s in self.saved if os.path.isdir(os.path.join(self.directory, str(s)))]

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def all_steps(self):
    return list(self.saved)

  def wait_until_finished(self):
    pass

  def check(self):
    pass

  def close(self):
    self.closed = True


def _config(**kw):
  c = dict(steps=7, log_every=2, checkpoint_every=3, eval_every=5, max_nonfinite_steps=5,
           profile=ml_collections.ConfigDict(dict(start_step=0, num_steps=1)))
  return ml_collections.ConfigDict({**c, **kw})


def _run(tmp_path, config, start=0, losses=None, stop_at=None, overlap=True, unit="step"):
  """Runs the loop on state = the number of updates applied (a step with a non-finite loss in
  `losses` applies none, as the guarded update steps); returns (result, manager, evals, rows)."""
  mngr, evals = Manager(tmp_path / "checkpoints", range(start, start + 1) if start else ()), []
  losses = losses or {}

  def step(state, done):
    if done + 1 == stop_at:
      os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.002)  # a step takes time
    loss = losses.get(done + 1, float(done + 1))
    ok = np.isfinite(loss)
    return state + ok, {"train/loss": loss, "train/lr": 0.5, "train/skipped": float(not ok)}

  def evaluate(state, step):
    evals.append((state, step))
    return {"eval/loss": float(state)}

  steps = run_loop.Steps(step, lambda state, s: mngr.save(s), evaluate, unit=unit,
                         speed=run_loop.Speed(100, 6.0, 1e9), overlap=overlap)
  log = run_loop.open_log(config, str(tmp_path), start)
  out = run_loop.run(steps, start, start, config, str(tmp_path), log, [mngr])
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return out, mngr, evals, rows


@pytest.mark.parametrize("overlap", [True, False])
def test_cadence_of_logs_evals_and_checkpoints(tmp_path, overlap):
  out, mngr, evals, rows = _run(tmp_path, _config(), overlap=overlap)
  assert mngr.saved == [3, 6, 7] and mngr.closed
  assert evals == [(5, 5), (7, 7)]  # the state after that many steps
  logged = {r["step"]: r for r in rows if "train/loss" in r}
  assert sorted(logged) == [2, 3, 4, 6, 7]  # log steps, and checkpoint steps off them
  assert logged[2]["train/loss"] == 1.5 and logged[3]["train/loss"] == 3.0  # windowed means
  assert logged[7]["train/loss"] == 7.0
  timed = [r for r in logged.values() if "train/step_time" in r]  # not right after a checkpoint
  assert timed
  for r in timed:  # throughput from the step time, MFU against the peak
    assert r["train/tokens_per_sec"] == pytest.approx(100 / r["train/step_time"])
    assert r["train/mfu"] == pytest.approx(r["train/tflops_per_device"] * 1e12 / 1e9)
  assert out["step"] == 7 and out["eval/loss"] == 7.0 and out["train/loss"] == 7.0


def test_resume_and_already_finished(tmp_path, capsys):
  out, mngr, evals, _ = _run(tmp_path, _config(), start=5)
  assert mngr.saved == [5, 6, 7] and evals == [(7, 7)] and out["step"] == 7
  out, mngr, evals, _ = _run(tmp_path, _config(), start=7)
  assert mngr.saved == [7] and evals == [] and out == {"step": 7}
  assert "already finished: step 7 >= config.steps=7" in capsys.readouterr().out


@pytest.mark.parametrize("overlap", [True, False])
def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop(tmp_path, overlap, capsys):
  """Iteration 5 alone is skipped: logged, left out of the means, training goes on. Iterations 7-9
  in a row are more than max_nonfinite_steps=2: the run stops, moving checkpoint 6 (the params
  all three started from) to checkpoints-corrupt/ and naming 4."""
  config = _config(steps=20, log_every=4, checkpoint_every=2, max_nonfinite_steps=2)
  nan = float("nan")
  with pytest.raises(UserError, match=r"^3 non-finite iterations in a row \(iterations 7-9\), more than "
                                      r"config\.max_nonfinite_steps=2: stopping; moved the checkpoints of "
                                      r"iterations \[6\], whose params gave them, to .*checkpoints-corrupt; "
                                      r"the last good checkpoint is iteration 4 in .*checkpoints$") as e:
    _run(tmp_path, config, losses={5: nan, 7: nan, 8: np.inf, 9: nan}, overlap=overlap, unit="iteration")
  assert "resumes from iteration 4" in e.value.hint
  assert os.listdir(tmp_path / "checkpoints-corrupt") == ["6-nonfinite"]  # moved, not deleted
  out = capsys.readouterr().out
  assert "iteration 5: non-finite train/loss nan: update skipped (1 in a row" in out
  assert "iteration 8: non-finite train/loss inf: update skipped (2 in a row" in out
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    logged = {r["step"]: r for r in map(json.loads, f)}
  assert logged[6]["train/loss"] == 6.0 and logged[6]["train/skipped"] == 0.5  # steps 5-6, 5 left out


def test_no_checkpoint_yet_stop_at_the_first_and_a_bad_resume_point(tmp_path):
  with pytest.raises(UserError, match=r"^1 non-finite step in a row \(step 1\), more than "
                                      r"config\.max_nonfinite_steps=0: stopping; there is no checkpoint yet$") as e:
    _run(tmp_path, _config(max_nonfinite_steps=0), losses={1: float("nan")})
  assert "rerunning starts over" in e.value.hint
  nan = float("nan")
  with pytest.raises(UserError, match=r"^2 non-finite steps in a row \(steps 6-7\), more than "
                                      r"config\.max_nonfinite_steps=1: stopping; the latest checkpoint, "
                                      r".*checkpoints/5, holds the params they started from$") as e:
    _run(tmp_path, _config(steps=20, max_nonfinite_steps=1), start=5, losses={6: nan, 7: nan})
  assert "delete" in e.value.hint  # the checkpoint this run resumed from is never removed


def test_a_non_finite_state_is_never_saved(tmp_path):
  """A trainer without the guard: its state turns NaN with a finite loss; the save refuses it."""
  mngr = Manager(tmp_path / "checkpoints", [3])
  steps = run_loop.Steps(lambda state, done: (float("nan") if done == 4 else state, {"train/loss": 1.0}),
                         lambda state, s: mngr.save(s), lambda state, s: {})
  log = run_loop.open_log(_config(), str(tmp_path), 3)
  with pytest.raises(UserError, match=r"the state after step 6 is not finite: not saved; the last good "
                                      r"checkpoint is step 3"):
    run_loop.run(steps, 0.0, 3, _config(), str(tmp_path), log, [mngr])
  assert mngr.saved == [3]


def test_stop_request_saves_and_returns(tmp_path, capsys):
  out, mngr, _, rows = _run(tmp_path, _config(steps=100, checkpoint_every=50), stop_at=5)
  assert out["step"] == 5 and mngr.saved == [5]
  assert rows[-1]["step"] == 5 and rows[-1]["train/loss"] == 5.0  # off the log steps, written too
  assert "stop requested: saved step 5; rerun the same command to resume" in capsys.readouterr().out
