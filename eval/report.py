"""The pipeline's report: one markdown table (rows = stages) and PNG plots."""
import json
import os

FMT = {"perplexity": "{:.3f}", "accuracy": "{:.3f}", "pass@k": "{:.3f}", "sampled_accuracy": "{:.3f}",
       "format": "{:.3f}", "length": "{:.1f}", "pair_accuracy": "{:.3f}", "win_rate": "{:.3f}",
       "kl": "{:.4f}", "reward": "{:.3f}"}


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
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def plot_curves(stage_dirs: dict, out_path: str, key: str = "train/loss"):
  """One panel per stage: the training curve (and the eval curve where logged)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(stage_dirs), figsize=(4 * len(stage_dirs), 3.2), squeeze=False)
  for ax, (stage, wd) in zip(axes[0], stage_dirs.items()):
    rows = read_metrics(wd)
    for k, style in ((key, "-"), ("eval/loss", "o-")):
      pts = [(r["step"], r[k]) for r in rows if k in r]
      if pts:
        ax.plot(*zip(*pts), style, label=k, markersize=3)
    ax.set_title(stage)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def plot_bars(rows: dict, columns, out_path: str):
  """Grouped bars: each metric (0..1 scale) by stage."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  cols = [c for c in columns if any(r.get(c) is not None for r in rows.values())]
  x = np.arange(len(cols))
  width = 0.8 / max(len(rows), 1)
  fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.4))
  for i, (stage, row) in enumerate(rows.items()):
    ax.bar(x + i * width, [row.get(c) or 0.0 for c in cols], width, label=stage)
  ax.set_xticks(x + width * (len(rows) - 1) / 2, cols)
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  ax.set_title("held-out metrics by stage")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def write(workdir: str, rows: dict, stage_dirs: dict, columns) -> str:
  """Writes report.md and the plots into workdir; returns the markdown table."""
  md = table(rows, columns)
  plot_curves(stage_dirs, os.path.join(workdir, "curves.png"))
  plot_bars(rows, [c for c in columns if c not in ("perplexity", "length")],
            os.path.join(workdir, "metrics.png"))
  examples = []
  for stage, row in rows.items():
    for ex in row.get("examples", [])[:2]:
      examples.append(f"- **{stage}** — Q: {ex['question']} → `{ex['completion'].strip()}` (answer {ex['answer']})")
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("# Kiln pipeline report\n\nHeld-out metrics of each stage's final checkpoint "
            "(problems never seen in training).\n\n" + md + "\n\n![curves](curves.png)\n\n"
            "![metrics](metrics.png)\n\n## Sample answers (greedy)\n\n" + "\n".join(examples) + "\n")
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump({s: {k: v for k, v in r.items() if k != "examples"} for s, r in rows.items()}, f, indent=2)
  return md
