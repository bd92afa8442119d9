"""The loop skeleton (train/run_loop.py) with a counting step: the cadence of logs, evaluations and
checkpoints, resuming, the non-finite guard, "already finished", and a stop request."""
import json
import os
import signal
import time

import ml_collections
import numpy as np
import pytest

from train import run_loop


class Manager:
  """A checkpoint manager that records what the loop asks of it."""

  def __init__(self, saved=()):
    self.saved, self.closed = list(saved), False

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def wait_until_finished(self):
    pass

  def check(self):
    pass

  def close(self):
    self.closed = True


def _config(**kw):
  c = dict(steps=7, log_every=2, checkpoint_every=3, eval_every=5,
           profile=ml_collections.ConfigDict(dict(start_step=0, num_steps=1)))
  return ml_collections.ConfigDict({**c, **kw})


def _run(tmp_path, config, start=0, losses=None, stop_at=None, overlap=True, unit="step"):
  """Runs the loop on state = the number of steps done; returns (result, manager, evals, rows)."""
  mngr, evals = Manager(range(start, start + 1) if start else ()), []
  losses = losses or {}

  def step(state, done):
    if done + 1 == stop_at:
      os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.002)  # a step takes time
    return state + 1, {"train/loss": losses.get(done + 1, float(done + 1)), "train/lr": 0.5}

  def evaluate(state, step):
    evals.append((state, step))
    return {"eval/loss": float(state)}

  steps = run_loop.Steps(step, lambda state, s: mngr.saved.append(s), evaluate, unit=unit,
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
def test_non_finite_loss_names_the_last_good_checkpoint(tmp_path, overlap):
  config = _config(steps=10, log_every=10, checkpoint_every=2)
  with pytest.raises(FloatingPointError, match=r"train/loss is nan at iteration 5; stopping\. The last "
                                               r"good checkpoint is iteration 4 in .*checkpoints"):
    _run(tmp_path, config, losses={5: np.nan}, overlap=overlap, unit="iteration")


def test_stop_request_saves_and_returns(tmp_path, capsys):
  out, mngr, _, rows = _run(tmp_path, _config(steps=100, checkpoint_every=50), stop_at=5)
  assert out["step"] == 5 and mngr.saved == [5]
  assert rows[-1]["step"] == 5 and rows[-1]["train/loss"] == 5.0  # off the log steps, written too
  assert "stop requested: saved step 5; rerun the same command to resume" in capsys.readouterr().out
