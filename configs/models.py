"""Named model presets. Each returns a fresh ConfigDict; override any key from the command line.

`tiny` is for tests, `demo` for `make demo`; `small` and `medium` are the benchmark shapes of
docs/performance.md; the rest are the real shapes of public checkpoints (GQA, RoPE scaling, qkv bias,
tied embeddings).
"""
import ml_collections

from configs.errors import UserError


def _base(**kw) -> ml_collections.ConfigDict:
  cfg = dict(
      vocab_size=512,
      d_model=64,
      n_layers=2,
      n_heads=4,
      n_kv_heads=4,
      head_dim=0,  # 0 = d_model // n_heads
      mlp_dim=192,
      rope_theta=10_000.0,
      # Llama-3 style RoPE scaling; factor 0 = off.
      rope_scaling=dict(factor=0.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_positions=8192),
      norm_eps=1e-5,
      qkv_bias=False,
      tie_embeddings=False,
      dtype="float32",        # compute dtype (bfloat16 on accelerators)
      param_dtype="float32",  # storage dtype of the weights
      scan_layers=False,      # nn.scan over layers: faster compiles for deep models
      remat="none",           # none | full | dots | context | qkv_context | attention | offload (model/transformer.py)
      attention="auto",       # auto (splash on TPUs, cudnn on NVIDIA GPUs in bf16, else xla) | xla | cudnn | splash
      init_std=0.02,
  )
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def tiny():
  return _base(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=192)


def demo():  # configs/demo.py on two CPU cores: the smallest shape that learns the arithmetic
  return _base(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=384)


def small():
  return _base(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=768)


def medium():
  return _base(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_dim=1536)


def llama3_1b():  # Llama 3.2 1B
  return _base(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
               head_dim=64, mlp_dim=8192, rope_theta=500_000.0, tie_embeddings=True,
               rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_positions=8192))


def llama3_8b():  # Llama 3.1 8B
  return _base(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
               head_dim=128, mlp_dim=14336, rope_theta=500_000.0,
               rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_positions=8192))


def llama3_70b():  # Llama 3.1 70B
  return _base(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
               head_dim=128, mlp_dim=28672, rope_theta=500_000.0,
               rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_positions=8192))


def qwen2_0_5b():
  return _base(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
               head_dim=64, mlp_dim=4864, rope_theta=1_000_000.0, norm_eps=1e-6,
               qkv_bias=True, tie_embeddings=True)


PRESETS = dict(tiny=tiny, demo=demo, small=small, medium=medium, llama3_1b=llama3_1b,
               llama3_8b=llama3_8b, llama3_70b=llama3_70b, qwen2_0_5b=qwen2_0_5b)


def get(name: str) -> ml_collections.ConfigDict:
  """Returns the preset called `name`; the error lists the known ones."""
  if name not in PRESETS:
    raise UserError(f"config.model: unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]()
