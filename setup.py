"""Kiln: one clear JAX codebase for pretraining, SFT, reward modeling, DPO, PPO and GRPO."""
from setuptools import find_packages, setup

TORCH = ["torch==2.13.0", "transformers>=5.0,<6"]  # the Hugging Face models Kiln converts and is compared with
TFDS = ["tensorflow-datasets>=4.9.8,<5"]  # config.data.source=tfds only (train/sources.py imports it there)
TPU = ["jax[tpu]>=0.10.2,<0.13"]  # libtpu: TPU VMs, and compiling for TPU slices on any host (train.aot)
ARROW = ["pyarrow>=14"]  # parquet files, datasets' save_to_disk directories (train/formats.py imports it there)
GCS = ["gcsfs>=2024.2"]  # gs:// paths (train/files.py, through fsspec; orbax's TensorStore has its own client)

setup(
    name="kiln-lm",
    version="0.1.0",
    description="Train language models end to end in JAX: pretrain, SFT, reward model, DPO, PPO, GRPO.",
    python_requires=">=3.10",
    packages=find_packages(include=["configs", "model", "train", "rl", "eval"]),
    # Floors are the first releases with the APIs the code calls.
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",               # optax.tree.norm
        "orbax-checkpoint>=0.11.14,<0.13",  # PyTreeRestore(partial_restore=True)
        "etils[epath]>=1.5",               # epath.Path: checkpoint metadata, TFDS data dirs
        "sentencepiece>=0.2,<0.3",
        "protobuf>=3.20",                  # sentencepiece_model_pb2: special tokens of a tokenizer.model
        "array-record>=0.8,<0.9",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "safetensors>=0.4",     # model/convert.py: Hugging Face checkpoints
        "tokenizers>=0.20",     # model/hf_tokenizer.py: tokenizer.json (imported lazily)
        "jinja2>=3.1.6",        # model/chat_template.py: a tokenizer's own chat template (sandboxed)
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",      # eval/report.py: the pipeline report's plots (imported lazily)
        "absl-py>=2.0",
    ],
    extras_require={
        # tests/test_convert.py builds tiny HF models and tokenizers locally and compares against them;
        # tests/test_data.py builds a local TFDS dataset; ruff lints
        # tests/test_aot.py compiles for TPU slices on the CPU: libtpu (from jax[tpu]) gives the devices
        # tests/test_formats.py writes parquet files and save_to_disk directories with datasets
        # tests/test_gcs.py runs a Cloud Storage emulator on 127.0.0.1
        "test": (["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "datasets>=3.0", "gcp-storage-emulator>=2024.8"]
                 + TORCH + TFDS + TPU + ARROW + GCS),
        "tfds": TFDS,
        "arrow": ARROW,
        "gcs": GCS,  # gs://bucket/... workdirs, data, init_from, HF import / export
        "gpu": ["jax[cuda12]>=0.10.2,<0.13"],
        "tpu": TPU,  # TPU VMs, and `python -m train.aot` anywhere
        "hf": TORCH,
        # eval/bench_peer.py --which trl_dpo / trl_grpo / trl_ppo: TRL's own trainers as peers in
        # `make bench`; 1.12 is TRL's last release with a PPOTrainer
        "peer": TORCH + ["trl==1.12.*", "datasets>=3.0"],
    },
)
