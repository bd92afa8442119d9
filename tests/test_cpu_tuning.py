"""train/cpu_tuning.py: what `apply()` sets, that importing the model sets nothing, and that a jitted
call's big temporary block is then reused, not faulted in again."""
import json
import os
import subprocess
import sys

import pytest

from train import cpu_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAP_CHILD = r"""
import resource, sys
from train import cpu_tuning
cpu_tuning.apply()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.exp(x[:, None] * x[None, :]) @ x))    # [4096, 4096] temporary
x = jnp.linspace(0.0, 1e-3, 4096)
for _ in range(3):
  f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) * resource.getpagesize() / 5 / 2**20)
"""

STATE_CHILD = r"""
import json, os, sys
import model, model.attention, model.decode, model.lm_head, model.sampling, model.transformer, rl.rollout
import jax
state = lambda: dict(xla_flags=os.environ.get("XLA_FLAGS", ""),
                     async_dispatch=jax.config.read("jax_cpu_enable_async_dispatch"))
before = state()
from train import cpu_tuning
backend = cpu_tuning.apply()
print(json.dumps(dict(before=before, after=state(), backend=backend)))
"""


def run_child(code: str, **env) -> str:
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KILN_MALLOC", "KILN_YNNPACK")}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                       env={**base, "JAX_PLATFORMS": "cpu", **env})
  return out.stdout.strip().splitlines()[-1]


def faulted_mb_per_call(env_value: str) -> float:
  """MB of fresh pages touched per call of a function with a 64 MB temporary (child process)."""
  return float(run_child(HEAP_CHILD, KILN_MALLOC=env_value))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_temporaries_are_reused_not_refaulted():
  if cpu_tuning.glibc() is None:
    pytest.skip("not glibc")
  system = faulted_mb_per_call("system")
  kiln = faulted_mb_per_call("")
  assert system > 48, f"glibc's default should map the 64 MB temporary afresh each call; got {system:.1f} MB"
  # reused: 0 MB on most runs; now and then the heap grows once (fragmentation), 64 MB in 5 calls
  assert kiln < system / 2, f"the temporary should be reused; {kiln:.1f} MB faulted per call"


def test_importing_the_model_changes_nothing_and_apply_sets_the_cpu_defaults():
  got = json.loads(run_child(STATE_CHILD))
  assert got["before"] == dict(xla_flags="", async_dispatch=True)  # model/ and rl/ are side-effect free
  assert got["backend"] == "cpu"
  assert got["after"]["xla_flags"] == cpu_tuning.EIGEN_MATMULS
  assert got["after"]["async_dispatch"] is (cpu_tuning.glibc() is None)
  kept = json.loads(run_child(STATE_CHILD, KILN_MALLOC="system", KILN_YNNPACK="1"))["after"]
  assert kept == dict(xla_flags="", async_dispatch=True)  # both switches keep JAX's and XLA's defaults


def test_xla_flags_adds_the_eigen_path_once_and_respects_the_switches():
  assert cpu_tuning.xla_flags("", {}) == cpu_tuning.EIGEN_MATMULS
  assert cpu_tuning.xla_flags("--a=1", {}) == "--a=1 " + cpu_tuning.EIGEN_MATMULS
  once = cpu_tuning.xla_flags("", {})
  assert cpu_tuning.xla_flags(once, {}) == once
  named = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert cpu_tuning.xla_flags(named, {}) == named  # the user's choice wins
  assert cpu_tuning.xla_flags("--a=1", {"KILN_YNNPACK": "1"}) == "--a=1"
