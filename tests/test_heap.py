"""model/heap.py: after `import model`, a jitted call's big temporary block is reused, not faulted in again."""
import os
import subprocess
import sys

import pytest

from model import heap

CHILD = r"""
import resource, sys
import model, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.exp(x[:, None] * x[None, :]) @ x))    # [4096, 4096] temporary
x = jnp.linspace(0.0, 1e-3, 4096)
for _ in range(3):
  f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) * resource.getpagesize() / 5 / 2**20)
"""


def faulted_mb_per_call(env_value: str) -> float:
  """MB of fresh pages touched per call of a function with a 64 MB temporary (child process)."""
  out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                       env={**os.environ, "KILN_MALLOC": env_value})
  return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_temporaries_are_reused_not_refaulted():
  if not heap.keep_freed_memory():
    pytest.skip("not glibc")
  system = faulted_mb_per_call("system")
  kiln = faulted_mb_per_call("")
  assert system > 48, f"glibc's default should map the 64 MB temporary afresh each call; got {system:.1f} MB"
  # reused: 0 MB on most runs; now and then the heap grows once (fragmentation), 64 MB in 5 calls
  assert kiln < system / 2, f"the temporary should be reused; {kiln:.1f} MB faulted per call"
