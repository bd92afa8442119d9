"""eval/bench.py's paired rounds: each ratio pairs a Kiln run with the peer run right after it."""
import itertools

import pytest

from eval import bench


def _fake_runs(monkeypatch, kiln_values, peer_values, metric="tokens_per_sec"):
  kiln, peer = iter(kiln_values), iter(peer_values)
  calls = []

  def run_one(expr):
    calls.append("peer" if expr.startswith("bench_peer") else "kiln")
    if calls[-1] == "kiln":
      return {metric: next(kiln), "peak_rss_mb": 1.0, "compile_s": 2.0}
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


def test_missing_peer_falls_back_to_reference_figure(monkeypatch):
  _fake_runs(monkeypatch, [3000.0], itertools.repeat(None))
  res = bench.measure("train_small", 1)
  assert "peer" not in res and "ratios" not in res
  assert "(PERF-NOTES machine)" in bench.row("train_small", res)
