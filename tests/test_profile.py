"""`config.profile`: a jax.profiler trace of the chosen steps lands in DIR/profile, and the run goes on."""
import glob
import gzip
import json
import os

import pytest

from train import loop


def test_profile_records_the_chosen_steps(tiny_config, tmp_path, capsys):
  c = tiny_config(steps=6, checkpoint_every=6, log_every=1, **{"profile.start_step": 3, "profile.num_steps": 2})
  out = loop.train(c, str(tmp_path))
  assert out["step"] == 6  # profiling does not cut the run short
  runs = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*"))
  assert len(runs) == 1, runs  # one trace, started once
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  (perfetto,) = glob.glob(os.path.join(runs[0], "*.trace.json.gz"))
  events = json.load(gzip.open(perfetto))["traceEvents"]
  on_device0 = [e["name"] for e in events if e.get("name", "").startswith("[0] ")
                and e["name"].endswith("Execute (jit_step)")]
  assert len(on_device0) == 2, on_device0  # steps 3 and 4, each one execution on device 0
  assert "profile of steps 3-4 written under" in capsys.readouterr().out
  with open(tmp_path / "metrics.jsonl") as f:
    assert sorted(json.loads(line)["step"] for line in f if "train/loss" in line) == [1, 2, 3, 4, 5, 6]


def test_profile_is_off_by_default(tiny_config, tmp_path):
  loop.train(tiny_config(steps=2, checkpoint_every=2), str(tmp_path))
  assert not os.path.exists(tmp_path / "profile")


@pytest.mark.parametrize("key,value,message", [("profile.start_step", -1, "config.profile.start_step=-1"),
                                               ("profile.num_steps", 0, "config.profile.num_steps=0")])
def test_profile_config_errors_name_the_key(tiny_config, tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    loop.train(tiny_config(**{key: value}), str(tmp_path))
