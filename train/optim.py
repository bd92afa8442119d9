"""Optax optimizer and learning-rate schedule from `config.optim`."""
import re

import jax
import optax

from configs.errors import UserError

# Parameters whose path matches get no weight decay: norms, embeddings, biases.
NO_DECAY = re.compile(r"(norm|embedding|bias)")


def schedule(optim_cfg, steps: int):
  """Linear warmup to `lr`, then cosine | linear decay to lr * end_lr_frac, or constant."""
  lr, warmup = optim_cfg.lr, min(optim_cfg.warmup_steps, max(steps - 1, 0))
  end = lr * optim_cfg.end_lr_frac
  decay_steps = max(steps - warmup, 1)
  if optim_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.end_lr_frac)
  elif optim_cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif optim_cfg.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise UserError(f"config.optim.schedule={optim_cfg.schedule!r}: use cosine | linear | constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
  """True for the leaves that get weight decay (matrices, not norms / embeddings / biases)."""
  def keep(path, _):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    return not NO_DECAY.search(name)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg, steps: int):
  """Returns (optax transformation, schedule fn): clip by global norm, then AdamW."""
  if optim_cfg.name != "adamw":
    raise UserError(f"config.optim.name={optim_cfg.name!r}: only adamw is implemented")
  lr = schedule(optim_cfg, steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask),
  )
  return tx, lr
