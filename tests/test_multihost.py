"""Two local processes (jax.distributed on 127.0.0.1, gloo collectives) train like one process."""
import subprocess

import numpy as np

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
