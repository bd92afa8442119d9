"""The PyTorch peer on the same shapes and machine: HF transformers Llama, eager, fp32.

  pip install -e '.[hf]'    # torch==2.13.0 (CPU), transformers
  python -m eval.bench_peer --which train --preset small
  python -m eval.bench_peer --which generate --preset small
  python -m eval.bench_peer --which dpo --preset small
  python -m eval.bench_peer --which trl_dpo --preset small   # needs pip install -e '.[peer]'
  python -m eval.bench_peer --which trl_grpo --preset small  # likewise
  python -m eval.bench_peer --which trl_ppo --preset small   # likewise

`make bench` runs these next to Kiln's own benchmarks (when torch is installed) so the ratio in its
table comes from the same machine, not from figures measured elsewhere. Train: one AdamW step on
random tokens (forward, loss, backward, update), median of `steps` after two warm-up steps.
Generate: `model.generate` with the KV cache, top-p 0.9, EOS off, median of `repeats` calls.
DPO: the same sigmoid-DPO step Kiln's eval/bench_dpo.py times (policy forward + backward on
chosen and rejected, a frozen reference forward, AdamW), written directly in PyTorch: a lower
bound on TRL's DPOTrainer step, which adds its own bookkeeping on top.
TRL DPO (`pip install -e '.[peer]'`: trl 1.12, the last release with PPOTrainer): TRL's
DPOTrainer itself on the same shapes, fp32 and without gradient checkpointing (DPOConfig defaults
to bf16 and checkpointing: ~15 s/step on an AVX2 CPU), median step time after two warm-up steps.
TRL GRPO (same extra): TRL's GRPOTrainer, 2 prompts x 8 generations, prompt 32, up to 64 new
tokens (sampling stops at EOS, Kiln's bench never stops early), beta 0.04 with its reference
model, fp32 without checkpointing, median step after two warm-up steps.
TRL PPO (same extra): trl.experimental.ppo.PPOTrainer, batch 8, prompt 32, 64 new tokens (no stop
token), 4 PPO epochs of one minibatch, reference, reward model and a separate critic, fp32; it
calls back only at step ends, so a step is the time between two; median after two warm-up steps.
Every function takes `device` ("cpu" or "cuda"): `make bench` runs the peer where Kiln's own
benchmark ran, so on a GPU box both sides use the GPU. On CUDA the peer's fp32 matmuls may use TF32,
as JAX's default precision does there.
"""
import argparse
import json
import statistics
import time

from configs import models


def median_seconds(fn, warmup: int, repeats: int) -> float:
  """Median wall time of `repeats` calls of fn() after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def hf_llama(preset: str, device: str = "cpu"):
  """A randomly initialised transformers LlamaForCausalLM with the shape of Kiln's `preset`."""
  import torch
  import transformers
  m = models.get(preset)
  cfg = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
      rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
      max_position_embeddings=4096, attn_implementation="sdpa")
  torch.manual_seed(0)
  if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default fp32 matmul precision on GPU
  return transformers.LlamaForCausalLM(cfg).float().to(device)


def bench_train(preset="small", seq_len=256, batch=8, steps=10, device="cpu", dtype="float32") -> dict:
  """One AdamW step; dtype bfloat16: fp32 weights, bf16 compute under torch.autocast (as Kiln's
  model.dtype=bfloat16 with fp32 param_dtype)."""
  import contextlib
  import torch
  model = hf_llama(preset, device).train()
  compute = (torch.autocast(device_type=device, dtype=torch.bfloat16) if dtype == "bfloat16" else
             contextlib.nullcontext())
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

  def step():
    with compute:
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)  # waits for the device

  dt = median_seconds(step, 2, steps)
  return dict(peer="torch eager HF Llama", torch=torch.__version__, threads=torch.get_num_threads(),
              device=device, dtype=dtype, preset=preset, seq_len=seq_len, batch=batch, step_s=round(dt, 6),
              tokens_per_sec=round(batch * seq_len / dt, 1))


def bench_generate(preset="small", batch=8, prompt_len=32, new_tokens=128, top_p=0.9, repeats=3,
                   device="cpu", dtype="float32") -> dict:
  import torch
  model = hf_llama(preset, device).to(getattr(torch, dtype)).eval()
  tokens = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=top_p < 1.0, top_p=top_p,
            top_k=0, temperature=1.0, use_cache=True, eos_token_id=None, pad_token_id=0)
  with torch.inference_mode():
    out = model.generate(tokens, attention_mask=torch.ones_like(tokens), **kw)
    dt = median_seconds(lambda: model.generate(tokens, attention_mask=torch.ones_like(tokens), **kw).cpu(),
                        0, repeats)
  assert out.shape[1] == prompt_len + new_tokens, out.shape
  return dict(peer="HF generate", torch=torch.__version__, device=device, dtype=dtype, preset=preset,
              batch=batch, new_tokens=new_tokens, top_p=top_p, seconds=round(dt, 6),
              tokens_per_sec=round(batch * new_tokens / dt, 1))


def bench_dpo(preset="small", batch=8, prompt_len=64, completion_len=64, beta=0.1, steps=5,
              device="cpu") -> dict:
  import torch
  import torch.nn.functional as F
  policy, ref = hf_llama(preset, device).train(), hf_llama(preset, device).eval()
  for p in ref.parameters():
    p.requires_grad_(False)
  opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
  t = prompt_len + completion_len
  tokens = torch.randint(0, policy.config.vocab_size, (2 * batch, t), device=device)  # rows 2i / 2i + 1:
  tokens[1::2, :prompt_len] = tokens[0::2, :prompt_len]                               # chosen / rejected
  mask = torch.zeros(2 * batch, t - 1, device=device)
  mask[:, prompt_len - 1:] = 1.0

  def logps(model):
    logits = model(input_ids=tokens).logits[:, :-1].float()
    lp = torch.gather(logits.log_softmax(-1), 2, tokens[:, 1:, None])[..., 0]
    return (lp * mask).sum(-1)

  def step():
    with torch.no_grad():
      r = logps(ref)
    p = logps(policy)
    margin = beta * ((p[0::2] - r[0::2]) - (p[1::2] - r[1::2]))
    loss = -F.logsigmoid(margin).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  dt = median_seconds(step, 1, steps)
  return dict(peer="torch eager DPO step (HF Llama, no TRL)", torch=torch.__version__, device=device,
              preset=preset, batch=batch, step_s=round(dt, 6))


def _word_tokenizer(vocab: int):
  """A transformers tokenizer whose words "t0".."t{vocab-4}" are one id each (+ pad, eos, unk)."""
  import tokenizers
  import transformers
  words = {f"t{i}": i for i in range(vocab - 3)}
  words.update({"<pad>": vocab - 3, "<eos>": vocab - 2, "<unk>": vocab - 1})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                              unk_token="<unk>")


def _step_timer(times: list, device: str):
  """A transformers TrainerCallback appending each optimizer step's wall time to `times`: from the
  step's begin, or from the previous step's end for trainers that call back only at step ends
  (TRL's PPOTrainer). On CUDA a step ends when the GPU has finished its work."""
  import torch
  import transformers

  class StepTimer(transformers.TrainerCallback):
    def on_train_begin(self, *args, **kwargs):
      self.t = time.perf_counter()

    def on_step_begin(self, *args, **kwargs):
      self.t = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
      if device == "cuda":
        torch.cuda.synchronize()
      now = time.perf_counter()
      times.append(now - self.t)
      self.t = now

  return StepTimer()


def bench_trl_dpo(preset="small", batch=8, prompt_len=64, completion_len=64, beta=0.1, steps=6,
                  device="cpu") -> dict:
  """TRL's DPOTrainer step: prompt_len + completion_len tokens per row (TRL appends EOS to the
  completion_len - 1 random words), reference model on, sigmoid loss."""
  import copy
  import random
  import tempfile
  import torch
  import trl
  from datasets import Dataset
  model = hf_llama(preset, device)
  vocab = model.config.vocab_size
  rng = random.Random(0)
  words = lambda n: " ".join(f"t{rng.randrange(vocab - 3)}" for _ in range(n))
  rows = [dict(prompt=words(prompt_len), chosen=" " + words(completion_len - 1),
               rejected=" " + words(completion_len - 1)) for _ in range(batch * (steps + 2))]
  times = []

  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=batch, beta=beta, max_steps=steps + 2,
                         learning_rate=1e-6, logging_steps=10_000, save_strategy="no", report_to="none",
                         use_cpu=device == "cpu", dataloader_num_workers=0, max_length=None, bf16=False,
                         gradient_checkpointing=False, disable_tqdm=True, seed=0)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=_word_tokenizer(vocab),
                             callbacks=[_step_timer(times, device)])
    trainer.train()
  return dict(peer=f"TRL {trl.__version__} DPOTrainer (fp32)", torch=torch.__version__, device=device,
              preset=preset,
              batch=batch, step_s=round(statistics.median(times[2:]), 6))


def bench_trl_grpo(preset="small", prompts=2, g=8, prompt_len=32, new_tokens=64, beta=0.04, steps=6,
                   device="cpu") -> dict:
  """TRL's GRPOTrainer step (sampling with transformers generate + scoring + one update)."""
  import random
  import tempfile
  import torch
  import trl
  from datasets import Dataset
  model = hf_llama(preset, device)
  vocab = model.config.vocab_size
  rng = random.Random(0)
  rows = [dict(prompt=" ".join(f"t{rng.randrange(vocab - 3)}" for _ in range(prompt_len)))
          for _ in range(prompts * (steps + 2))]
  times = []

  def reward(completions, **kwargs):  # cheap, like Kiln's bench
    return [float(len(c) % 7) for c in completions]

  with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out + "/model")  # GRPOTrainer loads its reference model from the policy's path
    args = trl.GRPOConfig(output_dir=out, per_device_train_batch_size=prompts * g, num_generations=g,
                          max_completion_length=new_tokens, beta=beta, temperature=1.0, top_p=1.0,
                          learning_rate=1e-6, max_steps=steps + 2, logging_steps=10_000, save_strategy="no",
                          report_to="none", use_cpu=device == "cpu", bf16=False, gradient_checkpointing=False,
                          dataloader_num_workers=0, disable_tqdm=True, seed=0,
                          model_init_kwargs={"dtype": torch.float32})
    trainer = trl.GRPOTrainer(model=out + "/model", reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=_word_tokenizer(vocab),
                              callbacks=[_step_timer(times, device)])
    trainer.train()
  return dict(peer=f"TRL {trl.__version__} GRPOTrainer (fp32)", torch=torch.__version__, device=device,
              preset=preset,
              prompts=prompts, g=g, step_s=round(statistics.median(times[2:]), 6))


def bench_trl_ppo(preset="small", batch=8, prompt_len=32, new_tokens=64, epochs=4, steps=5,
                  device="cpu") -> dict:
  """TRL's PPOTrainer step (trl 1.12, its last release with PPO): sample new_tokens (no stop token),
  score with a reward model, reference and critic forward passes, then `epochs` passes over one
  minibatch updating policy and critic (a separate value model), fp32."""
  import copy
  import random
  import tempfile
  import torch
  import transformers
  from datasets import Dataset
  import trl
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  policy = hf_llama(preset, device)
  vocab = policy.config.vocab_size
  rng = random.Random(0)
  rows = [dict(input_ids=[rng.randrange(vocab - 3) for _ in range(prompt_len)]) for _ in range(batch * (steps + 2))]

  def scalar_model():  # reward model and critic: the same trunk with a one-output score head
    torch.manual_seed(1)
    return transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**{**policy.config.to_dict(), "num_labels": 1, "pad_token_id": vocab - 3})
    ).float().to(device)

  times = []

  with tempfile.TemporaryDirectory() as out:
    args = PPOConfig(output_dir=out, per_device_train_batch_size=batch, local_rollout_forward_batch_size=batch,
                     num_mini_batches=1, num_ppo_epochs=epochs, response_length=new_tokens, stop_token=None,
                     total_episodes=batch * (steps + 2), num_sample_generations=0, temperature=1.0,
                     kl_coef=0.05, learning_rate=1e-6, report_to="none", use_cpu=device == "cpu", bf16=False,
                     gradient_checkpointing=False, save_strategy="no", logging_steps=10_000,
                     disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = PPOTrainer(args=args, processing_class=_word_tokenizer(vocab), model=policy,
                         ref_model=copy.deepcopy(policy).eval(), reward_model=scalar_model().eval(),
                         value_model=scalar_model(), train_dataset=Dataset.from_list(rows),
                         callbacks=[_step_timer(times, device)])
    trainer.train()
  return dict(peer=f"TRL {trl.__version__} PPOTrainer (fp32)", torch=torch.__version__, device=device,
              preset=preset,
              batch=batch, epochs=epochs, step_s=round(statistics.median(times[2:]), 6))


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--which", choices=["train", "generate", "dpo", "trl_dpo", "trl_grpo", "trl_ppo"], default="train")
  p.add_argument("--preset", default="small")
  p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
  a = p.parse_args()
  if a.which == "train":
    seq, batch = (256, 8) if a.preset == "small" else (512, 4)
    print(json.dumps(bench_train(a.preset, seq, batch, steps=10 if a.preset == "small" else 5, device=a.device)))
  else:
    fn = {"generate": bench_generate, "dpo": bench_dpo, "trl_dpo": bench_trl_dpo, "trl_grpo": bench_trl_grpo,
          "trl_ppo": bench_trl_ppo}[a.which]
    print(json.dumps(fn(a.preset, device=a.device)))
