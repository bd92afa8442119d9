"""The whole pipeline end to end in miniature (configs/demo.py with the tiny model, a few steps per
stage, small eval sets): every stage runs from the previous one's checkpoint, a rerun skips the
finished stages and redoes a missing one, and the report holds every metric that applies, finite."""
import json
import math
import os
import shutil

import numpy as np
import pytest

from configs import demo
from eval import report, suite
from train import pipeline

STEPS = dict(pretrain=4, sft=4, reward=3, dpo=3, grpo=2, ppo=2)
# the metrics that do not apply to a stage (None in report.json, "-" in the table)
NOT_APPLICABLE = dict(pretrain={"kl", "pair_accuracy"}, sft={"win_rate", "kl", "pair_accuracy"},
                      reward=set(suite.COLUMNS) - {"pair_accuracy"}, dpo=set(),
                      grpo={"pair_accuracy"}, ppo={"pair_accuracy"})


def mini_config(cache_dir):
  c = demo.get_config("tiny")
  for name, steps in STEPS.items():
    s = c[name]
    s.steps, s.checkpoint_every, s.log_every, s.eval_every = steps, steps, 1, 0
    s.async_checkpoints, s.eval_batches = False, 1
    s.data.cache_dir = cache_dir
    s.seq_len = 64 if name in ("pretrain", "sft") else 96
    s.batch_size = 16
  c.pretrain.data.num_documents = c.sft.data.num_documents = 4000
  c.reward.data.num_documents = c.dpo.data.num_documents = 400   # 8 held-out pairs
  for name in ("grpo", "ppo"):
    r = c[name].rl
    r.max_new_tokens, r.num_eval_problems, r.eval_at_start, r.num_iterations = 16, 0, False, 1
  c.grpo.rl.num_generations, c.grpo.rl.num_minibatches = 4, 1
  c.ppo.rl.num_minibatches = 2
  c.eval.num_problems, c.eval.samples, c.eval.max_new_tokens, c.eval.perplexity_batches = 8, 2, 16, 1
  return c


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, data_cache):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  config = mini_config(data_cache)
  rows = pipeline.run_pipeline(config, workdir)
  return config, workdir, rows


def test_every_stage_runs_from_the_previous_checkpoint(demo_run):
  config, workdir, _ = demo_run
  starts = dict(sft="pretrain", reward="sft", dpo="sft", grpo="sft", ppo="sft")
  for name, steps in STEPS.items():
    assert pipeline.finished_step(os.path.join(workdir, name)) == steps, name
    with open(os.path.join(workdir, name, "config.json")) as f:
      init_from = json.load(f)["init_from"]
    expected = os.path.abspath(os.path.join(workdir, starts[name])) if name in starts else ""
    assert init_from == expected, name
    assert os.listdir(os.path.join(workdir, name, "tb")), f"{name}: no TensorBoard log"


def test_report_has_every_metric_finite(demo_run):
  _, workdir, rows = demo_run
  with open(os.path.join(workdir, "report.json")) as f:
    saved = json.load(f)
  assert list(saved) == list(STEPS)
  for name, row in saved.items():
    for col in suite.COLUMNS:
      if col in NOT_APPLICABLE[name]:
        assert row[col] is None, (name, col)
      else:
        assert isinstance(row[col], float) and math.isfinite(row[col]), (name, col, row[col])
    assert 0 <= row["pair_accuracy" if name == "reward" else "accuracy"] <= 1
  assert saved["dpo"]["kl"] >= 0 and saved["grpo"]["kl"] >= 0
  md = open(os.path.join(workdir, "report.md")).read()
  for name in STEPS:
    assert f"| {name} |" in md
  for png in ("curves.png", "metrics.png", "kl_reward.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000, png


def test_rerun_skips_finished_stages_and_redoes_a_missing_one(demo_run, capsys):
  config, workdir, _ = demo_run
  shutil.rmtree(os.path.join(workdir, "ppo"))
  before = os.path.getmtime(os.path.join(workdir, "grpo", "metrics.jsonl"))
  capsys.readouterr()
  pipeline.run_stages(pipeline.check(config, workdir), workdir)
  out = capsys.readouterr().out
  for name in ("pretrain", "sft", "reward", "dpo", "grpo"):
    assert f"== {name}: finished earlier (step {STEPS[name]}), skipped" in out
  assert "== ppo: ppo from" in out
  assert pipeline.finished_step(os.path.join(workdir, "ppo")) == STEPS["ppo"]
  assert os.path.getmtime(os.path.join(workdir, "grpo", "metrics.jsonl")) == before


def test_bad_stage_reference_names_the_key(data_cache, tmp_path):
  config = mini_config(data_cache)
  config.grpo.init_from = "@nosuch"
  with pytest.raises(ValueError, match=r"config.grpo.init_from='@nosuch'"):
    pipeline.check(config, str(tmp_path))
  config = mini_config(data_cache)
  config.stages = ["pretrain", "sft", "typo"]
  with pytest.raises(ValueError, match=r"config.stages: 'typo'"):
    pipeline.check(config, str(tmp_path))
  config = mini_config(data_cache)
  config.sft.batch_size = 12
  with pytest.raises(ValueError, match=r"config.sft.batch_size=12"):
    pipeline.check(config, str(tmp_path))


def test_a_stopped_stage_stops_the_pipeline(data_cache, tmp_path, monkeypatch):
  """A stage that returns before its last step (Ctrl-C saved it) must not hand over to the next."""
  ran = []
  monkeypatch.setattr(pipeline, "run_stage", lambda cfg, stage_dir: ran.append(stage_dir))
  config = mini_config(data_cache)
  with pytest.raises(SystemExit, match=r"== pretrain: stopped at step -1 of 4; rerun"):
    pipeline.run_stages(pipeline.check(config, str(tmp_path)), str(tmp_path))
  assert ran == [str(tmp_path / "pretrain")]


def test_reward_curve_moving_average_matches_numpy():
  values = np.random.default_rng(0).normal(size=23)
  for window in (1, 4, 10, 30):
    want = [np.mean(values[max(0, i - window + 1):i + 1], dtype=np.float64) for i in range(len(values))]
    np.testing.assert_allclose(report.moving_average(list(values), window), want, rtol=1e-12)
