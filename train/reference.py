"""The frozen reference model of the preference stages: where it comes from, and its log-probs.

- LoRA (config.lora.rank > 0): the frozen base IS the reference (the policy with adapters
  dropped), so there is no second copy of the weights.
- Full fine-tuning: a frozen copy of `config.init_from`, restored into the params' shardings; the
  step takes it as an argument that is never donated and never seen by the optimizer.
- `config.dpo.precompute_reference`: the reference log-probs of every pair are computed once before
  training, cached in `workdir/reference_logps/`, and carried by the batches as `ref_logps` [b, 2]:
  no reference forward pass per step, and the full-fine-tuning copy is dropped afterwards.
"""
import io
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding
from train import files, objectives, pairs, rundir, sources
from train.params import abstract_params


def load(config, objective, st, model, mesh):
  """(reference params or None, a note for the start-up line). Under LoRA: `st.frozen` itself."""
  if not objective.needs_reference(config):
    return None, ""
  if st.frozen is not None:
    return st.frozen, "reference: the frozen LoRA base (no copy)"
  abs_params, param_sh, _, _ = abstract_params(model, config.seq_len, mesh)
  ref, step = rundir.restore_params(config.init_from, abs_params, param_sh)
  return ref, f"reference: frozen copy of {config.init_from} (step {step})"


def precompute_logps(config, workdir, tok, model, ref_params, mesh, split: str,
                     process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Reference log-probs [N, 2] (chosen, rejected) of every pair of a split; cached in the workdir."""
  ps = pairs.load(config, tok, split)
  ident = sources.stable_hash(ps.key, files.absolute(config.init_from),
                              rundir.latest_step(config.init_from), config.model.to_dict())
  path = os.path.join(workdir, "reference_logps", f"{split}-{ident}.npy")
  if files.isfile(path):
    with files.open(path, "rb") as f:
      return np.load(f)
  logps = jax.jit(lambda p, b: objectives.pair_logps(p, b, model, config.logits_chunk)[0],
                  out_shardings=NamedSharding(mesh, P()))  # [B, 2], on every process
  out = [np.asarray(logps(ref_params, sharding.put_batch(b, mesh)))
         for b in pairs.ordered_batches(ps, config.batch_size, process_index, process_count)]
  table = np.concatenate(out)[:len(ps)].astype(np.float32)  # [N, 2]
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.save(buffer, table)
    files.write_atomic(path, buffer.getvalue())
  return table


def prepare(config, objective, st, model, mesh, workdir, tok, process_index=0, process_count=1):
  """(reference params for the step or None, extra batch columns per split, note).

  With `config.dpo.precompute_reference` the log-probs go into the columns and no params are
  returned (the LoRA base stays: it is the model being trained).
  """
  ref, note = load(config, objective, st, model, mesh)
  if ref is None or not config.dpo.precompute_reference:
    return ref, {}, note
  columns = {s: {"ref_logps": precompute_logps(config, workdir, tok, model, ref, mesh, s,
                                               process_index, process_count)}
             for s in ("train", "eval")}
  return None, columns, note + "; log-probs precomputed once"
