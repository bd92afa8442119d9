"""Helpers for tests that launch `python -m train` as real processes."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices: int) -> dict:
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONUNBUFFERED"] = "1"
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  return e


def command(workdir: str, cache: str, *overrides: str) -> list:
  return [sys.executable, "-m", "train", "--config", os.path.join(ROOT, "configs/pretrain_tiny.py"),
          "--workdir", workdir, f"--config.data.cache_dir={cache}", "--config.data.num_documents=4000",
          "--config.seq_len=64", "--config.batch_size=16", "--config.eval_batches=2", *overrides]


def run(cmd, devices=1, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, env=env(devices), cwd=ROOT, capture_output=True, text=True, **kw)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_losses(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
