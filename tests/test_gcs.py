"""gs:// paths for real, on a Cloud Storage emulator (gcp-storage-emulator, in memory on 127.0.0.1,
started here): the file layer (train/files.py) writes, lists, renames and reads objects, and locks
a workdir; slow: `python -m train` with its workdir and its data on the emulator saves, stops and
resumes with the losses of an uninterrupted local run, bit for bit."""
import importlib.util
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from model import sharding
from model.transformer import ModelConfig, Transformer
from tests import _cli
from train import checksums, files, rundir
from train import params as params_lib

# gcsfs is not imported here: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT (below) when imported
pytestmark = pytest.mark.skipif(not (importlib.util.find_spec("gcsfs") and importlib.util.find_spec(
    "gcp_storage_emulator")), reason="needs the test extra's gcsfs and gcp-storage-emulator")

BUCKET = "kiln"


@pytest.fixture(scope="module")
def emulator():
  """The environment that points gcsfs and TensorStore at a fresh emulator (set in this process too)."""
  from gcp_storage_emulator.handlers import objects
  from gcp_storage_emulator.server import create_server
  plain = objects.download
  objects.download = _with_generation(plain)
  port = _cli.free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url,            # gcsfs
         "TENSORSTORE_GCS_HTTP_URL": url,         # TensorStore (orbax's arrays)
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no credentials lookup
         "FSSPEC_GCS_TOKEN": "anon",              # gcsfs: no credentials lookup
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # no bucket-type probe (a gRPC API it lacks)
  before = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield env
  for k, v in before.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()
  objects.download = plain


def _with_generation(download):
  """The emulator's object download plus the x-goog-generation header Cloud Storage sends: without
  it TensorStore takes generation 0 and its next conditional write of an OCDBT manifest fails."""
  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    except Exception:  # a missing object: the download answers 404
      pass
    return download(request, response, storage, *args, **kwargs)
  return download_with_generation


def test_file_layer_writes_lists_renames_and_reads_objects(emulator):
  root = f"gs://{BUCKET}/layer"
  files.write_atomic(f"{root}/a/x.txt", "one\n")
  with files.open(f"{root}/a/sub/y.bin", "wb") as f:
    f.write(b"\x00\x01\x02")
  assert files.isdir(f"{root}/a") and files.isfile(f"{root}/a/x.txt") and not files.exists(f"{root}/b")
  assert sorted(files.listdir(f"{root}/a")) == ["sub", "x.txt"]
  assert files.files_under(f"{root}/a") == ["sub/y.bin", "x.txt"]
  assert files.glob(f"{root}/a/*.txt") == [f"{root}/a/x.txt"]
  assert files.getsize(f"{root}/a/sub/y.bin") == 3

  files.rename(f"{root}/a", f"{root}/b")
  assert not files.exists(f"{root}/a") and files.files_under(f"{root}/b") == ["sub/y.bin", "x.txt"]
  with files.open(f"{root}/b/x.txt") as f:
    assert f.read() == "one\n"
  local = files.local(f"{root}/b")
  with open(os.path.join(local, "sub", "y.bin"), "rb") as f:
    assert f.read() == b"\x00\x01\x02"

  for text in ("1\n", "2\n"):  # two runs append to one metrics file
    with files.Appender(f"{root}/metrics.jsonl") as log:
      log.write(text)
      log.flush()
  with files.open(f"{root}/metrics.jsonl") as f:
    assert f.read() == "1\n2\n"

  files.rmtree(f"{root}/b")
  assert not files.exists(f"{root}/b")


def test_checksums_of_a_step_on_gcs_catch_a_changed_byte_and_the_step_is_set_aside(emulator):
  root = f"gs://{BUCKET}/sums/checkpoints"
  step = f"{root}/3"
  for name, data in (("params/d.bin", bytes(range(200))), ("meta/m.json", b"{}")):
    files.write_atomic(f"{step}/{name}", data)
  checksums.write(step)
  assert checksums.verify(step) == (checksums.OK, "")
  files.write_atomic(f"{step}/params/d.bin", bytes(range(1, 201)))  # same size, other bytes
  assert checksums.verify(step)[0] == "checksum"
  assert checksums.verify(step, skip=("params",)) == (checksums.OK, "")
  assert checksums.set_aside(root, 3, "checksum") == f"{root}-corrupt/3-checksum"
  assert not files.exists(step)
  assert files.files_under(f"{root}-corrupt/3-checksum") == ["kiln_checksums.json", "meta/m.json", "params/d.bin"]


def test_a_second_run_in_a_gcs_workdir_stops_naming_the_first(emulator):
  workdir = f"gs://{BUCKET}/locked"
  with rundir.locked(workdir):
    assert files.isfile(f"{workdir}/{rundir.LOCK}")
    with pytest.raises(rundir.WorkdirInUse, match=f"pid {os.getpid()}"):
      with rundir.locked(workdir):
        pass
  assert not files.exists(f"{workdir}/{rundir.LOCK}")  # released
  files.write_atomic(f"{workdir}/{rundir.LOCK}", f"host {os.uname().nodename} pid {2**22 + 1}\n")
  with rundir.locked(workdir):  # a holder of this host that is gone: taken over
    pass


def test_a_config_file_on_gcs_loads_as_a_local_one(emulator):
  """--config gs://bucket/x.py[:arg] (either flag form): the entry points load its local copy."""
  from train import cli
  with open(os.path.join(os.path.dirname(__file__), "..", "configs", "dpo_tiny.py")) as f:
    files.write_atomic(f"gs://{BUCKET}/configs/dpo.py", f.read())
  argv = cli.local_config(["train", "--config", f"gs://{BUCKET}/configs/dpo.py:demo", "--config.steps=3",
                           "--workdir=gs://kiln/run"])
  assert argv[3:] == ["--config.steps=3", "--workdir=gs://kiln/run"] and not files.is_url(argv[2])
  config = cli.load_config_file(argv[2])
  assert config.objective == "dpo" and config.model.d_model == 128  # the demo preset: the :arg
  assert cli.local_config([f"--config=gs://{BUCKET}/configs/dpo.py"]) == [f"--config={argv[2][:-5]}"]


def test_a_data_cache_on_gcs_is_refused_naming_the_key():
  from configs import pretrain_tiny
  from configs.errors import UserError
  from train import sources
  c = pretrain_tiny.get_config()
  c.data.cache_dir = f"gs://{BUCKET}/cache"
  with pytest.raises(UserError, match="config.data.cache_dir="):
    sources.cache_dir(c)


def _documents(n: int) -> list:
  from train import corpus
  return [{"text": t} for t in corpus.pretrain_documents(7, n)]


@pytest.mark.slow
def test_run_with_its_workdir_on_gcs_saves_stops_and_resumes_exactly(emulator, tmp_path, data_cache):
  data = f"gs://{BUCKET}/data/train.jsonl"
  with files.open(data, "w") as f:
    f.write("".join(json.dumps(d) + "\n" for d in _documents(1500)))
  common = ["--config.data.source=jsonl", f"--config.data.path=gs://{BUCKET}/data/*.jsonl",
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=0", "--config.log_every=1",
            "--config.checkpoint_every=5", "--config.eval_every=0", "--config.async_checkpoints=false"]
  env = {**_cli.env(1), **emulator}

  def train(workdir, steps):
    out = subprocess.run(_cli.command(workdir, data_cache, *common, f"--config.steps={steps}"), env=env,
                         cwd=_cli.ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr

  straight = str(tmp_path / "straight")
  train(straight, 12)
  workdir = f"gs://{BUCKET}/run"
  train(workdir, 7)  # stops at 7: a final save there
  assert sorted(int(s) for s in files.listdir(f"{workdir}/checkpoints") if s.isdigit()) == [5, 7]
  assert "resumed from step 7" in train(workdir, 12)
  assert not os.path.exists(os.path.join(_cli.ROOT, "gs:"))  # nothing went to a local "gs:" folder

  with files.open(f"{workdir}/metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  resumed = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert sorted(resumed) == list(range(1, 13))
  assert resumed == _cli.train_losses(straight)
  assert rundir.load_config(workdir).steps == 12 and files.isfile(f"{workdir}/tokenizer/sentencepiece.model")

  # HF export into the bucket and import from it: the params of the run, bit for bit, read back
  # from the imported run and as init_from=hf:gs://... reads them
  rundir.export_hf(workdir, f"gs://{BUCKET}/hf")
  rundir.import_hf(f"gs://{BUCKET}/hf", f"gs://{BUCKET}/imported")
  model = Transformer(ModelConfig.from_config(rundir.load_config(workdir).model))
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  abstract, shardings, _, _ = params_lib.abstract_params(model, 8, mesh)
  with sharding.use_mesh(mesh):
    trained, imported, hf = (jax.device_get(rundir.restore_params(path, abstract, shardings)[0]) for path in
                             (workdir, f"gs://{BUCKET}/imported", f"{rundir.HF_PREFIX}gs://{BUCKET}/hf"))
  jax.tree.map(np.testing.assert_array_equal, trained, imported)
  jax.tree.map(np.testing.assert_array_equal, trained, hf)
