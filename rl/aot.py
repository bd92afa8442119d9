"""The programs of an online RL iteration as train.aot compiles them: shapes only, no arrays.

`compile_programs(config, model_cfg, mesh)` compiles, with abstract sharded arrays on a compile-only mesh:
- "update": rl/steps.py `make_update_step` (the policy, a critic where the algorithm has one) on
  one minibatch of batch_size / rl.num_minibatches completions of rl.max_new_tokens tokens after
  rl.max_prompt_len prompt tokens, with every array the scoring and advantages add (their shapes
  from `jax.eval_shape` of the real functions);
- "prefill": the rollout's prompt pass into a KV cache (model/decode.py, with rl/rollout.py's
  shared-prompt apply) for all sampled completions (batch_size; more with rl.oversample), cache as
  long as prompt + completion;
- "decode_step": one decode step against that cache (model forward of one token + sampling).
Between and during them the policy's params, its optimizer state, the critic and the frozen
reference stay on the chips: `resident` lists them, so a report can add what a program does not
take as an argument to its peak. The scoring pass (a forward of the same shapes) and a reward
model are not compiled.
"""
import jax
import jax.numpy as jnp

from configs.errors import UserError
from model import decode, sharding
from model.sampling import Sampling, sample
from model.transformer import Transformer
from rl import algorithms, config as rl_config, rollout, steps, value
from rl.loop import check_config
from train import compiler_options, optim
from train import state as state_lib
from train.compiled import shaped
from train.params import abstract_params


def check(config, num_devices: int) -> None:
  """The checks of `python -m train` for an RL objective on num_devices chips (init_from not read)."""
  check_config(config, num_devices, 1, launch=False)
  if state_lib.lora_enabled(config):
    raise UserError("config.lora.rank > 0: train.aot compiles the RL programs of full fine-tuning only",
                    hint="--config.lora.rank=0")


def _state(model, tx, mesh, seq_len: int, extra=None):
  """(params, optimizer state) as sharded shapes."""
  abs_params, param_sh, _, boxed = abstract_params(model, seq_len, mesh, extra)
  boxed_opt = jax.eval_shape(tx.init, boxed)
  return shaped(abs_params, param_sh), shaped(sharding.unbox(boxed_opt), sharding.tree_shardings(boxed_opt, mesh))


def _rows(tree, mesh):
  """Shapes of per-completion arrays, batch-sharded."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim)),
                      tree)


def _update(config, model_cfg, mesh, state, tx, lr_fn):
  """The update step compiled on one minibatch with every array scoring and advantages put in it."""
  r, (params, opt, critic, critic_opt, ref) = config.rl, state
  g, p, t, rows = r.num_generations, r.max_prompt_len, r.max_new_tokens, config.batch_size // r.num_minibatches
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  prompts = {k: jax.ShapeDtypeStruct((rows // g, p), jnp.int32, sharding=replicated) for k in ("prompt", "prompt_mask")}
  batch = {**prompts, **_rows({k: jax.ShapeDtypeStruct((rows, t), jnp.int32) for k in ("tokens", "mask")}, mesh)}
  critic_cfg = model_cfg if critic is not None else None
  score = steps.make_score_fn(model_cfg, config, None, old=True, ref=ref is not None, critic_cfg=critic_cfg)
  batch.update(_rows(jax.eval_shape(score, params, None, ref, critic, None, batch), mesh))
  adv = lambda s, b, beta: algorithms.get(config.objective).advantages(config, s, b, beta)
  batch.update(_rows(jax.eval_shape(adv, jax.ShapeDtypeStruct((rows,), jnp.float32), batch, 0.0), mesh))
  options = compiler_options.for_platform(config.compiler_options, mesh.devices.flat[0].platform)
  update = jax.jit(steps.make_update_step(model_cfg, config, tx, lr_fn, None, critic_cfg), donate_argnums=(0, 1, 2, 3),
                   compiler_options=options)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
  return update.lower(params, opt, critic, critic_opt, None, batch, scalar(jnp.float32), scalar(jnp.int32)).compile()


def _rollout(config, model_cfg, mesh, params):
  """(prefill, decode step) compiled for all sampled completions (batch_size, more with rl.oversample):
  the prompt once per group into a cache as long as prompt + completion, then one token per row."""
  r = config.rl
  n = rl_config.sampled_prompts(config) * r.num_generations
  g, p, t = r.num_generations, r.max_prompt_len, r.max_new_tokens
  tokens = _rows({k: jax.ShapeDtypeStruct((n, p), jnp.int32) for k in ("tokens", "mask")}, mesh)
  prefill = jax.jit(lambda q, tok, m: decode._prefill(rollout.group_apply(g), model_cfg, q, tok, m, p - 1 + t)[0])
  compiled_prefill = prefill.lower(params, tokens["tokens"], tokens["mask"]).compile()
  cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(prefill, params, tokens["tokens"], tokens["mask"]),
                       compiled_prefill.output_shardings)
  sampling = Sampling(r.temperature, r.top_k, r.top_p)

  def decode_step(q, cache, token, position, u):  # [n] each: one token per row, its uniform draw
    logits, cache = decode.transformer_apply(model_cfg, q, token[:, None], position[:, None],
                                             jnp.ones_like(token)[:, None], cache)
    return sample(None, logits[:, -1], sampling, u=u)[0], cache

  row = _rows({"token": jax.ShapeDtypeStruct((n,), jnp.int32), "u": jax.ShapeDtypeStruct((n,), jnp.float32)}, mesh)
  step = jax.jit(decode_step, donate_argnums=1)
  return compiled_prefill, step.lower(params, cache, row["token"], row["token"], row["u"]).compile()


def compile_programs(config, model_cfg, mesh):
  """({name: (compiled, flops per call, names of the resident trees it takes)}, {name: resident tree})."""
  r = config.rl
  model = Transformer(model_cfg)
  tx, lr_fn = optim.make_optimizer(config.optim, config.steps * r.num_iterations * r.num_minibatches)
  where_values = algorithms.value_model(config)
  with sharding.use_mesh(mesh):
    params, opt = _state(model, tx, mesh, config.seq_len, value.value_head_params if where_values == "policy" else None)
    critic, critic_opt = _state(model, tx, mesh, config.seq_len, value.value_head_params) \
        if where_values == "critic" else (None, None)
    ref = _state(model, tx, mesh, config.seq_len)[0] if rl_config.needs_reference(config) else None
    update = _update(config, model_cfg, mesh, (params, opt, critic, critic_opt, ref), tx, lr_fn)
    prefill, decode_step = _rollout(config, model_cfg, mesh, params)

  g, p, t = r.num_generations, r.max_prompt_len, r.max_new_tokens
  n = rl_config.sampled_prompts(config) * g   # sampled completions
  rows = config.batch_size // r.num_minibatches
  fwd = lambda tokens, length: model_cfg.train_flops_per_token(length) / 3 * tokens  # a forward pass
  update_flops = 3 * fwd(rows // g * p + rows * t, p + t) * (2 if critic is not None else 1)
  programs = {
      "update": (update, update_flops, ("params", "opt_state", "critic", "critic_opt_state")),
      "prefill": (prefill, fwd(n // g * p, p), ("params",)),
      "decode_step": (decode_step, fwd(n, p + t), ("params",)),
  }
  resident = {"params": params, "opt_state": opt, "critic": critic, "critic_opt_state": critic_opt, "reference": ref}
  return programs, {k: v for k, v in resident.items() if v is not None}
