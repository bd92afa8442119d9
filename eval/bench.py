"""`make bench`: one table of throughput figures, written to bench/results.json.

Each benchmark runs in its own process, one at a time (two busy processes on two cores distort
each other far more than 2x), and reports its own peak memory. PyTorch peer figures on this
machine class (from ../shared/PERF-NOTES.md, measured with PyTorch 2.13 eager) give the ratios.

  python -m eval.bench [--only train_small,decode] [--out bench/results.json]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (python expression run in a child, metric, unit, peer figure, what the peer is)
BENCHES = {
    "train_small": ("bench_train.bench_train('small', 256, 8)", "tokens_per_sec", "tok/s", 3600.0,
                    "PyTorch eager HF Llama, 3,475-3,781 tok/s"),
    "train_medium": ("bench_train.bench_train('medium', 512, 4, steps=5)", "tokens_per_sec", "tok/s",
                     560.0, "PyTorch eager HF Llama, 536-584 tok/s"),
    "decode_small": ("bench_decode.bench_decode('small', 8, 32, 128, 0.9)", "tokens_per_sec", "tok/s",
                     720.0, "HF generate top-p 0.9, 661-785 tok/s"),
    "dpo_small": ("bench_dpo.bench_dpo()", "step_s", "s/step", 1.15, "TRL DPOTrainer, 1.10-1.21 s/step"),
    "grpo_small": ("bench_rl.bench_grpo()", "step_s", "s/step", 1.68, "TRL GRPOTrainer, 1.64-1.72 s/step"),
    "ppo_small": ("bench_rl.bench_ppo()", "step_s", "s/step", 2.7, "TRL PPOTrainer 1.12, 2.59-2.79 s/step"),
}

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
module = {module!r}
try:
  mod = __import__("eval." + module, fromlist=[module])
except ImportError as e:
  print(json.dumps({{"skipped": f"eval/{{module}}.py not available: {{e}}"}})); sys.exit(0)
t0 = time.perf_counter()
out = eval({expr!r}, {{module: mod}})
out["wall_s"] = time.perf_counter() - t0
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def run_one(name: str) -> dict:
  expr, *_ = BENCHES[name]
  module = expr.split(".")[0]
  code = CHILD.format(root=ROOT, module=module, expr=expr)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def row(name: str, res: dict) -> str:
  _, metric, unit, peer, peer_what = BENCHES[name]
  if "skipped" in res or "error" in res:
    return f"| {name} | - | - | - | - | - | {res.get('skipped') or res.get('error')} |"
  value = res[metric]
  ratio = value / peer if unit == "tok/s" else peer / value   # > 1 means faster than the peer
  mfu = f"{100 * res['mfu']:.1f}%" if "mfu" in res else "-"
  compile_s = res.get("compile_s", res.get("first_call_s"))
  return (f"| {name} | {value:,.2f} {unit} | {mfu} | {compile_s:.1f} s | {res['peak_rss_mb']:,.0f} MB | "
          f"{ratio:.2f}x | {peer_what} |" if compile_s is not None else
          f"| {name} | {value:,.2f} {unit} | {mfu} | - | {res['peak_rss_mb']:,.0f} MB | {ratio:.2f}x | {peer_what} |")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
  args = ap.parse_args()
  names = [n for n in args.only.split(",") if n] or list(BENCHES)
  results = {}
  print("| bench | result | MFU | compile | peak memory | vs peer | peer |\n|---|---|---|---|---|---|---|",
        flush=True)
  for name in names:
    results[name] = run_one(name)
    print(row(name, results[name]), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
