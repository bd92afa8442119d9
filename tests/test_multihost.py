"""Two local processes (jax.distributed on 127.0.0.1, gloo collectives) train like one process, also
when one of them starts late."""
import subprocess

import numpy as np
import pytest

from tests import _cli


def test_two_processes_agree_with_one(tmp_path, data_cache):
  steps = ["--config.steps=6", "--config.log_every=1", "--config.checkpoint_every=3",
           "--config.eval_every=0"]
  single = _cli.run(_cli.command(str(tmp_path / "single"), data_cache, *steps), devices=4, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  port = _cli.free_port()
  procs = [subprocess.Popen(
      _cli.command(str(tmp_path / "multi"), data_cache, *steps, f"--coordinator=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}"),
      env=_cli.env(2), cwd=_cli.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "4 cpu devices x 2 processes" in outs[0]

  a, b = _cli.train_losses(tmp_path / "single"), _cli.train_losses(tmp_path / "multi")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-4)
  assert (tmp_path / "multi" / "checkpoints" / "6").is_dir()


LATE = '''"""python -m train, with process 1 held 8 s before it checks for a resume (a loaded box's lag)."""
import runpy, sys, time
import jax
from train import stage
check = stage.check_resume
def late(config, workdir):
  if jax.process_index() == 1:
    time.sleep(8)
  return check(config, workdir)
stage.check_resume = late
sys.argv[0] = "train"
runpy.run_module("train", run_name="__main__")
'''


@pytest.mark.slow
def test_a_process_late_to_its_resume_check_follows_process_0(tmp_path, data_cache):
  """Process 0 writes DIR (config.json, checkpoints/) before a late process 1 looks: process 1 must
  not take the run for a resume (it opened a checkpoint reader, whose orbax barrier met process 0's
  create_directory: "sync_global_devices name mismatch"), fresh or resumed."""
  late = tmp_path / "late.py"
  late.write_text(LATE)
  for steps in (1, 2):  # a fresh run, then its resume
    port = _cli.free_port()
    cmd = _cli.command(str(tmp_path / "run"), data_cache, f"--config.steps={steps}", "--config.eval_every=0",
                       "--config.checkpoint_every=1000", f"--coordinator=127.0.0.1:{port}", "--num_processes=2")
    cmd[1:3] = [str(late)]  # [python, -m, train, ...] -> [python, late.py, ...]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=_cli.env(2), cwd=_cli.ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0 and f"finished at step {steps}" in out, out[-3000:]
  assert "resumed from step 1" in outs[0]
