"""eval/bench.py's paired rounds: each ratio pairs a Kiln run with the peer run right after it."""
import itertools

import pytest

from eval import bench


def _fake_runs(monkeypatch, kiln_values, peer_values, metric="tokens_per_sec", backend="cpu", exprs=None):
  kiln, peer = iter(kiln_values), iter(peer_values)
  calls = []

  def run_one(expr, accelerator_only=False):
    calls.append("peer" if expr.startswith("bench_peer") else "kiln")
    if exprs is not None:
      exprs.append(expr)
    if calls[-1] == "kiln":
      return {metric: next(kiln), "peak_rss_mb": 1.0, "compile_s": 2.0, "backend": backend}
    value = next(peer)
    return {"skipped": "no torch"} if value is None else {metric: value, "peer": "stub"}

  monkeypatch.setattr(bench, "run_one", run_one)
  return calls


def test_rounds_alternate_and_pair_ratios(monkeypatch):
  calls = _fake_runs(monkeypatch, [300.0, 100.0, 200.0], [150.0, 100.0, 400.0])
  res = bench.measure("train_small", 3)
  assert calls == ["kiln", "peer"] * 3
  assert res["tokens_per_sec"] == 200.0 and res["rounds"] == [300.0, 100.0, 200.0]
  assert res["peer"]["tokens_per_sec"] == 150.0
  assert res["ratios"] == [2.0, 1.0, 0.5]  # tok/s: Kiln over peer, round by round
  assert "1.00x (0.50-2.00, 3 rounds)" in bench.row("train_small", res)


def test_seconds_metric_ratio_is_peer_over_kiln(monkeypatch):
  _fake_runs(monkeypatch, [0.5, 0.4], [1.0, 1.2], metric="step_s")
  res = bench.measure("dpo_small", 2)
  assert res["step_s"] == 0.5 and res["ratios"] == pytest.approx([2.0, 3.0])  # even: slower middle
  assert res["peer"]["step_s"] == 1.0


def _ratio_column(line):
  return line.split("|")[6].strip()  # | bench | result | MFU | compile | memory | vs peer | peer |


def test_missing_peer_prints_no_ratio(monkeypatch):
  _fake_runs(monkeypatch, [3000.0], itertools.repeat(None))
  res = bench.measure("train_small", 1)
  assert "peer" not in res and "ratios" not in res
  assert res["no_peer"] == "no peer measured on cpu: no torch"  # results.json says why
  line = bench.row("train_small", res)
  assert _ratio_column(line) == "-" and "no peer measured on cpu: no torch" in line


def test_peer_runs_on_the_device_kiln_ran_on(monkeypatch):
  exprs = []
  _fake_runs(monkeypatch, [2000.0], [500.0], backend="gpu", exprs=exprs)
  res = bench.measure("decode_small", 1)
  assert exprs[1] == "bench_peer.bench_generate('small', 8, 32, 128, 0.9, device='cuda')"
  assert res["ratios"] == [4.0]
  exprs.clear()
  _fake_runs(monkeypatch, [2000.0], [500.0], backend="cpu", exprs=exprs)
  bench.measure("decode_small", 1)
  assert exprs[1].endswith("device='cpu')")


def test_no_cpu_figure_stands_in_for_an_accelerator_peer(monkeypatch):
  calls = _fake_runs(monkeypatch, [90000.0], itertools.repeat(500.0), backend="tpu")
  res = bench.measure("train_small", 1)
  assert calls == ["kiln"] and "peer" not in res  # no torch device for a TPU: no peer run
  line = bench.row("train_small", res)
  assert "no peer measured on tpu" in res["no_peer"] and "no peer measured on tpu" in line
  assert _ratio_column(line) == "-"


def test_real_size_benches_are_skipped_on_cpu():
  for name in bench.ACCELERATOR_ONLY:  # a child process that imports JAX, finds the CPU and stops
    res = bench.measure(name, 1)
    assert "accelerator only" in res["skipped"] and "accelerator only" in bench.row(name, res)
