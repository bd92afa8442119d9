"""Errors a user can fix stop a launch in one line plus a hint, exit code 2, no traceback (train/cli.py
`run`; --debug or KILN_DEBUG=1 shows it), naming the key with the closest existing one; a rejected
launch or resume leaves DIR/config.json as it was, and a resume may change only the keys that do not
shape the checkpoint (train/stage.py `check_resume`)."""
import copy
import os
import subprocess
import sys

import pytest

from configs import base, grpo_arith, pretrain_tiny, sft_tiny, tools
from configs.errors import UserError, closest
from rl import config as rl_config
from rl import loop as rl_loop
from rl import rewards
from tests import _cli
from train import cli, loop, objectives, pipeline, stage
from train.validate import validate


def one_line_error(out) -> str:
  """The error line of a process that stopped on a user error (asserting the form: error + hint)."""
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), out.stderr
  return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
  """A tiny pretraining run of 2 steps with its checkpoint, and its config."""
  c = pretrain_tiny.get_config()
  c.data.cache_dir, c.data.num_documents = data_cache, 4000
  c.seq_len, c.batch_size, c.steps, c.checkpoint_every = 64, 16, 2, 2
  c.log_every, c.eval_every, c.eval_batches, c.async_checkpoints = 1, 0, 1, False
  workdir = str(tmp_path_factory.mktemp("user_errors") / "run")
  pipeline.run_stage(c, workdir)
  return workdir, c


def saved_config(workdir: str) -> bytes:
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    return f.read()


# ------------------------------------------------------------------ keys and values (in-process)


def test_an_unknown_nested_key_is_named_with_the_closest_one():
  guess = r"no such key \(did you mean config\.optim\.lr\?\)"
  with pytest.raises(UserError, match=r"^config\.optim\.learning_rate: " + guess):
    cli.check_overrides(["prog", "--config.optim.learning_rate=1e-3"], sft_tiny.get_config())
  with pytest.raises(UserError, match=r"config\.tempreature: no such key \(did you mean config\.temperature\?\)"):
    cli.check_overrides(["prog", "--config.tempreature", "0.5"], tools.sample())
  with pytest.raises(UserError, match=r"config\.optim\.lr is a value"):
    cli.check_overrides(["prog", "--config.optim.lr.x=1"], base.base_config())
  cli.check_overrides(["prog", "--config.optim.lr=1e-3", "--noconfig.async_checkpoints", "--workdir=x"],
                      base.base_config())
  c = base.base_config()
  with c.unlocked():
    c.optim.lr_typo = 1.0
  with pytest.raises(UserError, match=r"^config\.optim\.lr_typo: " + guess):
    validate(c, num_devices=8)
  assert closest("sfft", objectives.OBJECTIVES) == "sft" and closest("zzz", ["lr", "b1"]) == ""


def test_an_unknown_reward_or_objective_names_the_valid_choices():
  c = grpo_arith.get_config()
  c.init_from = "runs/sft"
  with c.unlocked():
    c.rl.rewards.answer_mach = 1.0
  with pytest.raises(UserError, match=r"config\.rl\.rewards\.answer_mach: .*(config\.rl\.rewards\.answer_match\?)"):
    rl_config.check(c)
  with pytest.raises(UserError, match=r"config\.rl\.rewards\.formt: no such reward function \(did you mean "
                                      r"config\.rl\.rewards\.format\?\)"):
    rewards.combined_reward({"formt": 1.0}, ["x"], ["1"])
  with pytest.raises(UserError, match=r"config\.objective='sfft': .*did you mean 'sft'"):
    objectives.get("sfft")


@pytest.mark.parametrize("key, value", [
    ("optim.lr", -1e-3), ("optim.lr", 0.0), ("optim.b2", 1.0), ("optim.weight_decay", -0.1),
    ("optim.warmup_steps", -1), ("optim.end_lr_frac", 1.5), ("lora.alpha", 0.0), ("eval_every", -1),
    ("model.norm_eps", 0.0), ("rl.temperature", 0.0), ("rl.top_p", 1.5), ("rl.beta", -0.1),
    ("rl.gamma", 1.5), ("rl.eps_low", 1.0), ("rl.vf_coef", -1.0), ("optim.lr", float("nan"))])
def test_a_value_out_of_range_is_named(key, value):
  c = grpo_arith.get_config()
  c.init_from = "runs/sft"
  section, _, last = key.rpartition(".")
  (c[section] if section else c)[last] = value
  with pytest.raises(UserError, match=rf"^config\.{key}={value} must be "):
    rl_loop.check_config(c)  # train/validate.py on the shared keys, rl/config.py on config.rl


# ------------------------------------------------------------------ resume (in-process)


def test_a_rejected_launch_leaves_config_json_as_it_was(run_dir):
  workdir, c = run_dir
  before = saved_config(workdir)
  bad = copy.deepcopy(c)
  bad.optim.lr = -1e-3
  with pytest.raises(UserError, match=r"config\.optim\.lr=-0\.001 must be > 0"):
    pipeline.run_stage(bad, workdir)
  assert saved_config(workdir) == before


def test_a_resume_with_another_model_is_rejected_listing_the_keys(run_dir):
  workdir, c = run_dir
  before = saved_config(workdir)
  other = copy.deepcopy(c)
  other.model.d_model, other.model.mlp_dim, other.steps = 128, 256, 4
  with pytest.raises(UserError, match=r"config\.model\.d_model: 64 \(saved\) -> 128; "
                                      r"config\.model\.mlp_dim: 192 \(saved\) -> 256$"):
    pipeline.run_stage(other, workdir)
  assert saved_config(workdir) == before


def test_a_learning_rate_change_on_resume_is_logged_and_accepted(run_dir, capsys):
  workdir, c = run_dir
  changed = copy.deepcopy(c)
  changed.optim.lr, changed.steps = c.optim.lr / 2, 3
  assert stage.check_resume(changed, workdir) == [
      f"config.optim.lr: {c.optim.lr!r} (saved) -> {c.optim.lr / 2!r}", "config.steps: 2 (saved) -> 3"]
  assert stage.check_resume(c, workdir) == []
  before = saved_config(workdir)
  try:
    stage.start_run(changed, workdir, loop._check).mngr.close()
    assert f"resume: config.optim.lr: {c.optim.lr!r} (saved) -> {c.optim.lr / 2!r}" in capsys.readouterr().out
    assert f'"lr": {c.optim.lr / 2!r}' in saved_config(workdir).decode()
  finally:
    with open(os.path.join(workdir, "config.json"), "wb") as f:
      f.write(before)


# ------------------------------------------------------------------ the entry points (processes)


def test_an_entry_point_prints_one_line_and_a_hint_then_exits_2(tmp_path):
  cmd = [sys.executable, "-m", "train", "--config", "configs/sft_tiny.py", "--workdir", str(tmp_path / "w"),
         "--config.optim.learning_rate=1e-3"]
  line = one_line_error(_cli.run(cmd, timeout=120))
  assert line == "error: config.optim.learning_rate: no such key (did you mean config.optim.lr?)"
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_kiln_debug_shows_the_traceback(tmp_path):
  cmd = [sys.executable, "-m", "train", "--config", "configs/sft_tiny.py", "--workdir", str(tmp_path / "w"),
         "--config.optim.learning_rate=1e-3"]
  out = subprocess.run(cmd, env={**_cli.env(1), "KILN_DEBUG": "1"}, cwd=_cli.ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0 and "Traceback" in out.stderr and "learning_rate" in out.stderr
  assert not os.path.exists(tmp_path / "w")


def test_sampling_a_run_without_a_checkpoint_names_the_workdir(run_dir, tmp_path):
  workdir = str(tmp_path / "no_checkpoint")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "wb") as f:
    f.write(saved_config(run_dir[0]))
  line = one_line_error(_cli.run([sys.executable, "-m", "eval.sample", "--workdir", workdir], timeout=120))
  assert line == f"error: {workdir}: no finished checkpoint yet" and "init_from" not in line


@pytest.mark.slow
def test_a_rejected_resume_from_the_command_line_leaves_config_json(run_dir):
  workdir, c = run_dir
  before = saved_config(workdir)
  cmd = [sys.executable, "-m", "train", "--config", "configs/pretrain_tiny.py", "--workdir", workdir,
         f"--config.data.cache_dir={c.data.cache_dir}", "--config.data.num_documents=4000", "--config.seq_len=64",
         "--config.batch_size=16", "--config.model.n_layers=3"]
  line = one_line_error(_cli.run(cmd, timeout=120))
  assert line.endswith("config.model.n_layers: 2 (saved) -> 3"), line
  assert saved_config(workdir) == before


def test_a_resume_with_another_frozen_base_storage_is_rejected(run_dir):
  """lora.quantize / base_dtype / block_size decide how the frozen base is stored and restored."""
  workdir, c = run_dir
  other = copy.deepcopy(c)
  other.lora.quantize, other.lora.block_size = "int8", c.lora.block_size * 2
  with pytest.raises(UserError, match=r"config\.lora\.block_size: \d+ \(saved\) -> \d+; "
                                      r"config\.lora\.quantize: 'none' \(saved\) -> 'int8'$"):
    stage.check_resume(other, workdir)
