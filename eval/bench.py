"""`make bench`: one table of throughput figures, written to bench/results.json.

Each benchmark runs in its own process, one at a time (two busy processes on two cores distort
each other far more than 2x), and reports its own peak memory. Where the PyTorch peer is installed
(`pip install -e '.[hf]'`: torch 2.13 + transformers), it is measured on the same shapes right
after Kiln's figure (eval/bench_peer.py) and the ratio uses that; where it is not, the row has no
ratio and bench/results.json says why (`no_peer`). Figures measured on other machines are in
docs/performance.md.

On a shared machine the speed of both sides drifts by 20% or more within minutes, so one Kiln
figure and one peer figure taken a minute apart can disagree by that much. `--rounds N` alternates
the two N times (Kiln, peer, Kiln, peer, ...) and reports the median of each side and the median
of the N paired ratios, with their range: each ratio compares two runs that saw the same machine.

  python -m eval.bench [--only train_small,decode] [--rounds 3] [--out bench/results.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from configs.errors import closest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (python expression run in a child, metric, unit, what the peer is)
BENCHES = {
    "train_small": ("bench_train.bench_train('small', 256, 8)", "tokens_per_sec", "tok/s",
                    "PyTorch eager HF Llama"),
    "train_medium": ("bench_train.bench_train('medium', 512, 4, steps=5)", "tokens_per_sec", "tok/s",
                     "PyTorch eager HF Llama"),
    "decode_small": ("bench_decode.bench_decode('small', 8, 32, 128, 0.9)", "tokens_per_sec", "tok/s",
                     "HF generate top-p 0.9"),
    "dpo_small": ("bench_dpo.bench_dpo()", "step_s", "s/step", "TRL DPOTrainer"),
    "grpo_small": ("bench_rl.bench_grpo()", "step_s", "s/step", "TRL GRPOTrainer"),
    "ppo_small": ("bench_rl.bench_ppo()", "step_s", "s/step", "TRL PPOTrainer 1.12"),
    # real model sizes, on GPUs / TPUs only (ACCELERATOR_ONLY)
    "train_llama3_1b": ("bench_train.bench_train('llama3_1b', 2048, 4, steps=5, dtype='bfloat16')",
                        "tokens_per_sec", "tok/s", "PyTorch eager HF Llama, bf16 autocast"),
    "decode_llama3_1b": ("bench_decode.bench_decode('llama3_1b', 8, 32, 128, 0.9, dtype='bfloat16', "
                         "param_dtype='bfloat16')", "tokens_per_sec", "tok/s", "HF generate, bf16"),
}
ACCELERATOR_ONLY = {"train_llama3_1b", "decode_llama3_1b"}  # minutes per step on a CPU

# name: python expressions (module eval.bench_peer) that measure the peer here, on the torch device
# matching the backend Kiln's run reported; the first that runs is used (TRL's trainers need
# `pip install -e '.[peer]'`, the others torch + transformers)
PEERS = {
    "train_small": "bench_peer.bench_train('small', 256, 8, device={device!r})",
    "train_medium": "bench_peer.bench_train('medium', 512, 4, steps=5, device={device!r})",
    "decode_small": "bench_peer.bench_generate('small', 8, 32, 128, 0.9, device={device!r})",
    "dpo_small": ("bench_peer.bench_trl_dpo('small', 8, 64, 64, device={device!r})",
                  "bench_peer.bench_dpo('small', 8, 64, 64, device={device!r})"),
    "grpo_small": "bench_peer.bench_trl_grpo('small', 2, 8, 32, 64, device={device!r})",
    "ppo_small": "bench_peer.bench_trl_ppo('small', 8, 32, 64, 4, device={device!r})",
    "train_llama3_1b": ("bench_peer.bench_train('llama3_1b', 2048, 4, steps=5, device={device!r}, "
                        "dtype='bfloat16')"),
    "decode_llama3_1b": ("bench_peer.bench_generate('llama3_1b', 8, 32, 128, 0.9, device={device!r}, "
                         "dtype='bfloat16')"),
}
TORCH_DEVICE = {"cpu": "cpu", "gpu": "cuda"}  # jax.default_backend() -> torch device; no TPU peer

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
module = {module!r}
if module != "bench_peer":  # Kiln's runs get what its commands get (the PyTorch peer runs as it is)
  __import__("train.cpu_tuning", fromlist=["apply"]).apply()
try:
  mod = __import__("eval." + module, fromlist=[module])
except ImportError as e:
  print(json.dumps({{"skipped": f"eval/{{module}}.py not available: {{e}}"}})); sys.exit(0)
if {accelerator_only!r}:
  import jax
  if jax.default_backend() == "cpu":
    print(json.dumps({{"skipped": "benched on an accelerator only (JAX has the CPU here)"}})); sys.exit(0)
t0 = time.perf_counter()
out = eval({expr!r}, {{module: mod}})
out["wall_s"] = time.perf_counter() - t0
if "jax" in sys.modules:  # Kiln's runs: which chip ("NVIDIA H100 80GB HBM3", "cpu", ...)
  out["device_kind"] = sys.modules["jax"].devices()[0].device_kind
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def run_one(expr: str, accelerator_only: bool = False) -> dict:
  module = expr.split(".")[0]
  code = CHILD.format(root=ROOT, module=module, expr=expr, accelerator_only=accelerator_only)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def speedup(unit: str, kiln: float, peer: float) -> float:
  """Kiln over peer (> 1: Kiln is faster): a throughput ratio, or a time ratio turned around."""
  return kiln / peer if unit == "tok/s" else peer / kiln


def measure(name: str, rounds: int) -> dict:
  """Kiln's result for `name` (the median round's), with "peer" and "rounds" when a peer ran.

  Each round times Kiln, then the first peer expression that runs. The result is Kiln's median
  round (of an even number, the slower middle one), "rounds" lists every round's metric, and with a
  peer "ratios" holds each round's paired Kiln / peer speedup and "peer" the peer's median round;
  without one, "no_peer" says why (no ratio is printed then)."""
  _, metric, unit, _ = BENCHES[name]
  slowest_first = lambda r: r[metric] if unit == "tok/s" else -r[metric]
  kilns, peers, no_peer = [], [], ""
  for _ in range(rounds):
    kiln = run_one(BENCHES[name][0], accelerator_only=name in ACCELERATOR_ONLY)
    if "skipped" in kiln or "error" in kiln:
      return kiln
    kilns.append(kiln)
    backend = kiln.get("backend", "cpu")
    device = TORCH_DEVICE.get(backend)
    exprs = PEERS.get(name, ()) if device else ()
    no_peer = f"no peer measured on {backend}" + ("" if device else " (PyTorch has no device for it)")
    for expr in exprs if isinstance(exprs, tuple) else (exprs,):
      peer = run_one(expr.format(device=device))
      if "skipped" not in peer and "error" not in peer:
        peers.append(peer)
        break
      no_peer = f"no peer measured on {backend}: {peer.get('skipped') or peer.get('error')}"
  res = dict(sorted(kilns, key=slowest_first)[(len(kilns) - 1) // 2])
  if len(peers) == len(kilns):
    res["peer"] = sorted(peers, key=slowest_first)[len(peers) // 2]
    res["ratios"] = [speedup(unit, k[metric], p[metric]) for k, p in zip(kilns, peers)]
  else:
    res["no_peer"] = no_peer
  res["rounds"] = [r[metric] for r in kilns]
  return res


def figure(value: float, unit: str) -> str:
  """6,838 tok/s or 0.0171 s/step: whole tokens, three significant digits of seconds (GPU steps)."""
  return f"{value:,.0f} {unit}" if unit == "tok/s" else f"{value:.3g} {unit}"


def row(name: str, res: dict) -> str:
  _, metric, unit, peer_what = BENCHES[name]
  if "skipped" in res or "error" in res:
    return f"| {name} | - | - | - | - | - | {res.get('skipped') or res.get('error')} |"
  measured = res.get("peer", {})
  value = res[metric]
  ratio = "-"  # without a peer measured here
  if metric in measured:
    peer = measured[metric]
    peer_what = (f"{measured['peer']} {measured.get('torch', '')} on {measured.get('device', 'cpu')}, "
                 f"measured here: {figure(peer, unit)}")
    ratio = f"{speedup(unit, value, peer):.2f}x"
  else:
    peer_what = f"{peer_what}: {res.get('no_peer') or 'no peer measured'}"
  if len(res.get("ratios", [])) > 1:
    ratios = res["ratios"]
    ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)"
  mfu = f"{100 * res['mfu']:.1f}%" if "mfu" in res else "-"
  compile_s = res.get("compile_s", res.get("first_call_s"))
  compile_s = "-" if compile_s is None else f"{compile_s:.1f} s"
  return (f"| {name} | {figure(value, unit)} | {mfu} | {compile_s} | {res['peak_rss_mb']:,.0f} MB | {ratio} | "
          f"{peer_what} |")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
  ap.add_argument("--rounds", type=int, default=1, help="Kiln / peer pairs per bench (alternated)")
  args = ap.parse_args()
  names = [n for n in args.only.split(",") if n] or list(BENCHES)
  for n in names:
    if n not in BENCHES:  # argparse: usage and one line, exit 2
      near = closest(n, BENCHES)
      guess = f" (did you mean {near}?)" if near else ""
      ap.error(f"--only {n}: no such bench{guess}; known: {', '.join(BENCHES)}")
  results = {}
  print("| bench | result | MFU | compile | peak memory | vs peer | peer |\n|---|---|---|---|---|---|---|",
        flush=True)
  for name in names:
    results[name] = measure(name, max(1, args.rounds))
    print(row(name, results[name]), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
