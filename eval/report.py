"""The pipeline's report: one markdown table (rows = stages, "-" where a metric does not apply),
report.json, and PNG plots: training curves per stage, accuracy and reward by stage, KL vs reward
of the RL stages."""
import json
import os

from train import files

FMT = {"perplexity": "{:.3f}", "accuracy": "{:.3f}", "pass@k": "{:.3f}", "sampled_accuracy": "{:.3f}",
       "format": "{:.3f}", "length": "{:.1f}", "pair_accuracy": "{:.3f}", "win_rate": "{:.3f}",
       "kl": "{:.3f}", "reward": "{:.3f}"}
BAR_METRICS = ("accuracy", "pass@k", "format", "win_rate", "pair_accuracy")
NOT_SAVED = ("completions", "examples")
REWARD_WINDOW = 10  # iterations in the moving average of an RL stage's reward curve


def table(rows: dict, columns) -> str:
  """Markdown table: one row per stage, a '-' where a metric does not apply."""
  head = "| stage | " + " | ".join(columns) + " |"
  lines = [head, "|" + "---|" * (len(columns) + 1)]
  for stage, row in rows.items():
    cells = [FMT.get(c, "{}").format(row[c]) if row.get(c) is not None else "-" for c in columns]
    lines.append(f"| {stage} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def read_metrics(workdir: str) -> list:
  path = os.path.join(workdir, "metrics.jsonl")
  if not files.exists(path):
    return []
  with files.open(path) as f:
    return [json.loads(line) for line in f]


def series(rows: list, key: str) -> list:
  """[(step, value)] of every logged `key`, the last value per step (a resumed run logs again)."""
  return sorted({r["step"]: r[key] for r in rows if key in r}.items())


def moving_average(values, window: int) -> list:
  """Mean of each value and the window - 1 before it (fewer at the start): a rollout's mean reward
  over a few prompts is noisy, its trend over iterations is what a curve should show."""
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v - (values[i - window] if i >= window else 0.0)
    out.append(total / min(i + 1, window))
  return out


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, out_path: str) -> None:
  with files.open(out_path, "wb") as f:  # a gs:// workdir too
    fig.savefig(f, dpi=100, format="png")


def plot_curves(stage_dirs: dict, out_path: str):
  """One panel per stage: train loss (RL: mean reward, faint, and its moving average over
  REWARD_WINDOW iterations) and its held-out curve where logged."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(stage_dirs), figsize=(3.6 * len(stage_dirs), 3.0), squeeze=False)
  for ax, (stage, wd) in zip(axes[0], stage_dirs.items()):
    rows = read_metrics(wd)
    keys = (("train/reward", "-"), ("eval/accuracy", "o-")) if series(rows, "train/reward") else \
           (("train/loss", "-"), ("eval/loss", "o-"))
    for k, style in keys:
      pts = series(rows, k)
      if pts and k == "train/reward":
        steps, values = zip(*pts)
        ax.plot(steps, values, "-", color="tab:green", alpha=0.3, linewidth=0.8)
        ax.plot(steps, moving_average(values, REWARD_WINDOW), "-", color="tab:green",
                label=f"train/reward ({REWARD_WINDOW}-iteration mean)")
      elif pts:
        ax.plot(*zip(*pts), style, label=k, markersize=3)
    ax.set_title(stage)
    ax.set_xlabel("iteration" if keys[0][0] == "train/reward" else "step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, out_path)
  plt.close(fig)


def plot_bars(rows: dict, out_path: str):
  """Held-out accuracy, pass@k, format, win rate and pair accuracy by stage (left), mean reward-model
  score of the greedy answers by stage (right)."""
  import numpy as np
  plt = _pyplot()
  cols = [c for c in BAR_METRICS if any(r.get(c) is not None for r in rows.values())]
  fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(1.5 * len(cols) + 6, 3.4),
                                 gridspec_kw={"width_ratios": [max(len(cols), 1), 2]})
  x, width = np.arange(len(cols)), 0.8 / max(len(rows), 1)
  for i, (stage, row) in enumerate(rows.items()):
    ax.bar(x + i * width, [row.get(c) or 0.0 for c in cols], width, label=stage)
  ax.set_xticks(x + width * (len(rows) - 1) / 2, cols)
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  ax.set_title("held-out metrics by stage")
  scored = {s: r["reward"] for s, r in rows.items() if r.get("reward") is not None}
  ax_r.bar(list(scored), list(scored.values()), color="tab:gray")
  ax_r.set_title("reward-model score of greedy answers")
  ax_r.tick_params(axis="x", labelsize=7)
  fig.tight_layout()
  _save(fig, out_path)
  plt.close(fig)


def plot_kl_reward(stage_dirs: dict, out_path: str) -> bool:
  """Mean reward against KL to the reference per iteration of each RL stage; False if none."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  drawn = False
  for stage, wd in stage_dirs.items():
    rows = read_metrics(wd)
    kl, reward = dict(series(rows, "train/kl_per_completion")), dict(series(rows, "train/reward"))
    steps = sorted(set(kl) & set(reward))
    if steps:
      ax.plot([kl[s] for s in steps], [reward[s] for s in steps], "o-", markersize=2, label=stage)
      drawn = True
  ax.set_xlabel("KL(policy || reference) per completion")
  ax.set_ylabel("mean reward of the rollout")
  ax.legend(fontsize=8)
  fig.tight_layout()
  if drawn:
    _save(fig, out_path)
  plt.close(fig)
  return drawn


def write(workdir: str, rows: dict, stage_dirs: dict, columns) -> str:
  """Writes report.md, report.json and the plots into workdir; returns the markdown table."""
  md = table(rows, columns)
  plot_curves(stage_dirs, os.path.join(workdir, "curves.png"))
  plot_bars(rows, os.path.join(workdir, "metrics.png"))
  plots = ["curves.png", "metrics.png"]
  if plot_kl_reward(stage_dirs, os.path.join(workdir, "kl_reward.png")):
    plots.append("kl_reward.png")
  examples = []
  for stage, row in rows.items():
    for ex in (row.get("examples") or [])[:2]:
      examples.append(f"- **{stage}** — Q: {ex['question']} → `{ex['completion'].strip()}` (answer {ex['answer']})")
  with files.open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("# Kiln pipeline report\n\nHeld-out metrics of each stage's final checkpoint "
            "(problems never seen in training); `-` where a metric does not apply.\n\n" + md + "\n\n"
            + "\n\n".join(f"![{p[:-4]}]({p})" for p in plots)
            + "\n\n## Sample answers (greedy)\n\n" + "\n".join(examples) + "\n")
  with files.open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump({s: {k: v for k, v in r.items() if k not in NOT_SAVED} for s, r in rows.items()}, f, indent=2)
  return md
