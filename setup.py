"""Kiln: one clear JAX codebase for pretraining, SFT, reward modeling, DPO, PPO and GRPO."""
from setuptools import find_packages, setup

setup(
    name="kiln-lm",
    version="0.1.0",
    description="Train language models end to end in JAX: pretrain, SFT, reward model, DPO, PPO, GRPO.",
    python_requires=">=3.10",
    packages=find_packages(include=["configs", "model", "train", "rl", "eval"]),
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "sentencepiece>=0.2,<0.3",
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.8,<0.9",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "safetensors>=0.4",     # model/convert.py: Hugging Face checkpoints
        "tokenizers>=0.20",     # model/hf_tokenizer.py: tokenizer.json (imported lazily)
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "absl-py>=2.0",
    ],
    extras_require={
        # tests/test_convert.py builds tiny HF models and tokenizers locally and compares against them
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5.0,<6",
                 "safetensors>=0.4", "tokenizers>=0.20"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.13"],
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
        "hf": ["torch==2.13.0", "transformers>=5.0,<6", "safetensors>=0.4", "tokenizers>=0.20"],
        # eval/bench_peer.py --which trl_dpo / trl_grpo / trl_ppo: TRL's own trainers as peers in
        # `make bench`; 1.12 is TRL's last release with a PPOTrainer
        "peer": ["torch==2.13.0", "transformers>=5.0,<6", "tokenizers>=0.20", "trl==1.12.*"],
    },
)
