"""Test session setup: 8 fake CPU devices (so sharding is exercised everywhere), fp32 matmuls, and the
process settings every entry point applies (train/cpu_tuning.py), so tests see what users get."""
import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same tiny programs: share compilations through a persistent cache.
jax.config.update("jax_compilation_cache_dir", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"kiln-test-jax-cache-{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from train import cpu_tuning  # noqa: E402

cpu_tuning.apply()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  """One data/tokenizer cache for the whole session: each corpus is prepared once."""
  return str(tmp_path_factory.mktemp("kiln_data_cache"))


@pytest.fixture
def tiny_config(data_cache):
  """A factory of small pretraining configs: tiny model, short rows, small built-in corpus."""
  from configs import pretrain_tiny

  def make(**overrides):
    c = pretrain_tiny.get_config()
    c.data.cache_dir = data_cache
    c.data.num_documents = 4000
    c.seq_len, c.batch_size, c.steps = 64, 16, 20
    c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 5, 0, 10, 2
    c.async_checkpoints = False
    c.update_from_flattened_dict(overrides)  # 'a.b' keys
    return c
  return make


def pytest_configure(config):
  config.addinivalue_line("markers", "eight_devices: builds a mesh of 8 devices (the 8 fake CPU ones)")


def pytest_collection_modifyitems(config, items):
  """On an accelerator with fewer than 8 devices (JAX_PLATFORMS=cuda on one GPU) the 8-device
  tests are skipped; on CPU they always run, since the flag above gives 8 devices there."""
  if jax.default_backend() == "cpu" or jax.device_count() >= 8:
    return
  skip = pytest.mark.skip(reason=f"needs 8 devices, {jax.default_backend()} has {jax.device_count()}")
  for item in items:
    if "eight_devices" in item.keywords:
      item.add_marker(skip)
