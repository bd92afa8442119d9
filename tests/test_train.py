"""The trainer end to end on the tiny config: learning, exact resume, NaN skip and stop, config errors."""
import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.errors import UserError
from train import data, loop


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def losses_rows(workdir):
  """Step -> its logged train metrics."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "train/skipped" in r}


def test_learning_drives_heldout_loss_down(tiny_config, tmp_path):
  c = tiny_config(steps=240, eval_every=120, checkpoint_every=240)
  c.optim.warmup_steps = 20
  first = tiny_config(steps=1, checkpoint_every=1)
  start = loop.train(first, str(tmp_path / "one"))["eval/loss"]
  end = loop.train(c, str(tmp_path / "run"))
  print("held-out loss", start, "->", end["eval/loss"])
  assert start > 5.0                      # ~log(512) at init
  assert end["eval/loss"] < 0.6 * start   # measured ~2.3 from ~6.2


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_config, tmp_path):
  kw = dict(log_every=1, checkpoint_every=5)
  straight = tiny_config(steps=12, **kw)
  straight.optim.schedule, straight.optim.warmup_steps = "constant", 0
  loop.train(straight, str(tmp_path / "straight"))
  first_half = tiny_config(steps=7, **kw)   # stops at 7 (not a multiple of 5): final save at 7
  first_half.optim.schedule, first_half.optim.warmup_steps = "constant", 0
  loop.train(first_half, str(tmp_path / "resumed"))
  out = loop.train(straight, str(tmp_path / "resumed"))
  assert out["step"] == 12
  a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
  assert sorted(b) == list(range(1, 13))
  np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-5)


def test_checkpoint_round_trips_exactly(tiny_config, tmp_path):
  c = tiny_config(steps=3, checkpoint_every=3)
  loop.train(c, str(tmp_path / "run"))
  mngr = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"),
                               item_names=("params", "opt_state", "meta"))
  raw = mngr.restore(3, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  from train import rundir
  from train.params import abstract_params
  from model import sharding
  from model.transformer import ModelConfig, Transformer
  mesh = sharding.make_mesh(c.mesh)
  abs_p, psh, *_ = abstract_params(Transformer(ModelConfig.from_config(c.model)), c.seq_len, mesh)
  params, step = rundir.restore_params(str(tmp_path / "run"), abs_p, psh)
  assert step == 3
  for x, y in zip(jax.tree.leaves(raw.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.abs(np.asarray(x)).sum() > 0


def test_nan_batches_are_skipped_and_too_many_in_a_row_stop_at_the_last_good_checkpoint(
    tiny_config, tmp_path, monkeypatch, capsys):
  real = data.make_batch_iterator
  poisoned = {4, 8, 9, 10}

  class Poisoned:
    """Yields the real batches, but batches 4 and 8-10 carry a NaN loss weight (bad data)."""
    def __init__(self, inner):
      self.inner, self.n = inner, 0
    def __next__(self):
      b, self.n = dict(next(self.inner)), self.n + 1
      if self.n in poisoned:
        b["loss_mask"] = b["loss_mask"] * np.float32("nan")
      return b
    def get_state(self):
      return self.inner.get_state()
    def set_state(self, s):
      self.inner.set_state(s)

  monkeypatch.setattr(data, "make_batch_iterator", lambda *a, **k: Poisoned(real(*a, **k)))
  c = tiny_config(steps=14, checkpoint_every=2, log_every=1, max_nonfinite_steps=2)
  with pytest.raises(UserError, match=r"3 non-finite steps in a row \(steps 8-10\).*the last good "
                                      r"checkpoint is step 6 in"):
    loop.train(c, str(tmp_path / "run"))
  assert "step 4: non-finite train/loss nan, train/grad_norm nan" in capsys.readouterr().out
  steps = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints")).all_steps()
  assert sorted(steps) == [2, 6]  # none written at 4 and 8: their updates were skipped
  m = {s: r for s, r in losses_rows(tmp_path / "run").items()}
  assert m[4]["train/skipped"] == 1 and "train/loss" not in m[4]  # a NaN is never logged
  assert all(m[s]["train/skipped"] == 0 and np.isfinite(m[s]["train/loss"]) for s in (3, 5, 6, 7))
  assert m[5]["train/loss"] != m[3]["train/loss"]  # training went on after the isolated skip


def test_config_errors_name_the_key(tiny_config):
  from train.validate import validate
  cases = [
      (dict(mesh=dict(data=3, fsdp=1, tensor=1)), "config.mesh"),
      (dict(batch_size=12), "config.batch_size"),
      (dict(**{"model.n_kv_heads": 3}), "config.model.n_kv_heads"),
      (dict(**{"optim.grad_accum": 3}), "config.optim.grad_accum"),
      (dict(**{"model.attention": "flash"}), "config.model.attention"),
      (dict(**{"model.attention": "cudnn"}), "config.model.dtype"),  # tiny is fp32
  ]
  for overrides, key in cases:
    c = tiny_config()
    for k, v in overrides.items():
      if k == "mesh":
        c.mesh.data = v["data"]
      else:
        target = c
        *path, last = k.split(".")
        for p in path:
          target = target[p]
        target[last] = v
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
      validate(c, num_devices=8)
  c = tiny_config()
  c.unlock()
  c.optim.lr_typo = 1.0
  with pytest.raises(ValueError, match=r"config\.optim\.lr_typo"):
    validate(c, num_devices=8)


def test_cpu_mfu_is_against_the_matmul_rate_measured_on_this_host(tiny_config):
  """No fixed CPU figure: on an AVX-512 box XLA's matmul ran at 2.2x the old constant (MFU 141%)."""
  c = tiny_config()
  loop.cpu_matmul_peak.cache_clear()  # measured now, right before the independent matmul below
  host = loop.cpu_matmul_peak()
  assert loop.peak_flops(c) == pytest.approx(host / jax.local_device_count())  # 8 fake devices share it
  x = jax.random.normal(jax.random.key(1), (1024, 1024))
  mm = jax.jit(lambda a: a @ a.T)
  mm(x).block_until_ready()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    mm(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  rate = 2 * 1024 ** 3 / min(times)
  print(f"measured peak {host / 1e9:.0f} GFLOP/s, an independent matmul {rate / 1e9:.0f}")
  assert host / 20 < rate < 1.5 * host  # the same work: the peak is this host's rate, not a constant
  c.peak_flops_per_device = 5e11
  assert loop.peak_flops(c) == 5e11
