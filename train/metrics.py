"""Where metrics go: console progress bar, metrics.jsonl and TensorBoard (process 0 only)."""
import json
import os
import sys
import time

import numpy as np

from train import files


class MetricsLogger:
  """`log(step, {"train/loss": ..., ...})` appends one JSON line and one TensorBoard point."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled
    self.total, self.start, self.t0 = total_steps, start_step, time.time()
    self.bar = self.tb = self.jsonl = None
    if not enabled:
      return
    files.makedirs(workdir)
    self.jsonl = files.Appender(os.path.join(workdir, "metrics.jsonl"))
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      self.tb = None
    if sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, smoothing=0.1,
                      unit="step", mininterval=1.0)

  def log(self, step: int, metrics: dict):
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in clean.items():
        self.tb.add_scalar(k, v, step)
    if "train/loss" in clean:
      text = (f"loss {clean['train/loss']:.4f} tok/s {clean.get('train/tokens_per_sec', 0):,.0f}"
              + (f" mfu {100 * clean['train/mfu']:.1f}%" if clean.get("train/mfu") else ""))
      if self.bar is not None:
        self.bar.set_postfix_str(text, refresh=False)
      else:  # logs, not a terminal: one plain line per log step, with the ETA
        done = max(step - self.start, 1)
        eta = (time.time() - self.t0) / done * (self.total - step)
        self.write(f"step {step}/{self.total}  {text}  eta {eta / 60:.1f} min")
    if any(k.startswith("eval/") for k in clean):
      self.write("  ".join(f"{k} {v:.4f}" for k, v in clean.items()) + f"  (step {step})")

  def advance(self, step: int):
    if self.bar is not None:
      self.bar.n = step
      self.bar.refresh()

  def write(self, text: str):
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self.enabled:
      if self.bar is not None:
        self.bar.close()
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()
