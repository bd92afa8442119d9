"""Ctrl-C / SIGTERM mid-run saves a readable checkpoint; rerunning the command resumes from it."""
import os
import signal
import subprocess
import time

from tests import _cli


def test_sigint_saves_and_rerun_resumes(tmp_path, data_cache):
  workdir = str(tmp_path / "run")
  cmd = _cli.command(workdir, data_cache, "--config.steps=100000", "--config.log_every=5",
                     "--config.checkpoint_every=100000", "--config.eval_every=0")
  proc = subprocess.Popen(cmd, env=_cli.env(1), cwd=_cli.ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and saved[0] >= 5, saved
  assert f"saved step {saved[0]}" in out

  resumed = _cli.run(cmd[:-4] + [f"--config.steps={saved[0] + 3}", "--config.log_every=1",
                                 "--config.eval_every=0"], timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved[0]}" in resumed.stdout + resumed.stderr
  steps = sorted(_cli.train_losses(workdir))
  assert steps[-1] == saved[0] + 3


def test_unknown_override_names_the_key(tmp_path, data_cache):
  out = _cli.run(_cli.command(str(tmp_path / "x"), data_cache, "--config.optim.lr_typo=1"), timeout=120)
  assert out.returncode != 0
  assert "lr_typo" in out.stderr
