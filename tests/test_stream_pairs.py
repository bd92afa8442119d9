"""Streamed preference pairs (train/stream.py, reward model and DPO with data.pipeline=stream): the
pairs of TRL-format JSONL and of parquet files are the cached pipeline's (same tokens, drops, skips,
rankings), every process takes its records, a resumed stream gives the batches of one that never
stopped, and DPO trains on the stream; a run interrupted and resumed logs the losses of one run.
Packed (data.pair_rows), the stream and the cached pipeline give every pair of an epoch once and
resume exactly."""
import collections
import json
import os

import numpy as np
import pytest

from configs import dpo_tiny, pretrain_tiny
from configs.errors import UserError
from tests.test_formats import assistant, write_jsonl, write_parquet
from tests.test_stream import assert_resumes, take
from tests.test_reward_dpo import configure
from model import hf_tokenizer
from train import corpus, data, loop, pairs
from train import stream as ST


def pair_records(n=90, seed=1):
  """TRL conversational pairs (explicit and implicit prompt), Kiln pairs, rankings; some too long for
  seq_len=64, some with chosen == rejected."""
  out = []
  for i, (msgs, chosen, rejected) in enumerate(pairs.builtin_records(corpus.train_problems(seed, n))):
    if i % 7 == 3:
      rejected = chosen
    if i % 11 == 5:
      chosen = chosen + " and so on" * 12
    kind = i % 4
    if kind == 0:
      out.append({"prompt": msgs, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]})
    elif kind == 1:
      out.append({"chosen": msgs + [assistant(chosen)], "rejected": msgs + [assistant(rejected)]})
    elif kind == 2:
      out.append({"prompt": msgs[0]["content"], "chosen": chosen, "rejected": rejected})
    else:
      out.append({"prompt": msgs[0]["content"], "responses": [chosen, rejected, "I do not know."]})
  return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("pairs")
  recs = pair_records()
  flat = [{"prompt": m[0]["content"], "chosen": c, "rejected": rj}  # the same pairs as strings, for parquet
          for r in recs for m, c, rj in pairs.parse_record(r, "x")]
  return {"jsonl": write_jsonl(d / "trl.jsonl", recs), "parquet": write_parquet(d / "p.parquet", flat, 16)}


@pytest.fixture(scope="module")
def tok_path(data_cache):
  """The built-in corpus's tokenizer (cached: the one the trainer tests use)."""
  return data.load_or_train_tokenizer(configure(pretrain_tiny.get_config(), data_cache)).path


@pytest.fixture(scope="module")
def tok(tok_path):
  return hf_tokenizer.load_tokenizer(tok_path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_cache, tok_path):
  """A 2-step pretraining run: the DPO start and reference."""
  workdir = str(tmp_path_factory.mktemp("base"))
  loop.train(configure(pretrain_tiny.get_config(), data_cache, seq_len=64, **{"data.num_documents": 4000}), workdir)
  return workdir


def dpo_config(tok_path, data_cache, fmt, path, init_from="", **kw):
  return configure(dpo_tiny.get_config(), data_cache, **{
      "init_from": init_from, "tokenizer.path": tok_path, "data.source": fmt, "data.path": path,
      "data.pipeline": "stream", **kw})


def triples_of(ps):
  """The (prompt, chosen, rejected) ids of a PairSet, row by row."""
  c = ps.columns
  out = []
  for row, p, (n_c, n_r) in zip(c["tokens"].tolist(), c["prompt_lengths"], c["lengths"]):
    out.append((row[:p], row[p:p + n_c], row[p + n_c:p + n_c + n_r]))
  return out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_streamed_pairs_are_the_cached_pipelines(tok_path, data_cache, files, tok, fmt):
  cfg = dpo_config(tok_path, data_cache, fmt, files[fmt])
  cached = pairs.load(cfg.copy_and_resolve_references(), tok, "train")
  assert cached.counts.dropped and cached.counts.identical
  rows, start, end = next(ST.record_windows(cfg, tok, 0, 1, ST.FIRST))  # one window: every record
  assert [tuple(map(list, t)) for t in rows] == triples_of(cached)
  halves = [next(ST.record_windows(cfg, tok, p, 2, ST.FIRST))[0] for p in range(2)]
  assert sorted(map(str, halves[0] + halves[1])) == sorted(map(str, rows))
  # a streamed batch: the cached batch's tokens and targets, padded to L = K = 2 seq_len
  got = ST._batch(cfg, tok, rows[:8])
  want = pairs.make_batch(cached, np.arange(8))
  L, K = ST.pair_sizes(cfg)
  assert got["tokens"].shape == (8, L) and got["targets"].shape == (8, K)
  for k, v in want.items():
    n = v.shape[1] if v.ndim == 2 else None
    np.testing.assert_array_equal(got[k][:, :n] if n else got[k], v, err_msg=k)
    if n and k not in ("tokens", "targets"):  # padding: pad tokens, slots 0 (targets there: unread)
      assert not got[k][:, n:].any(), k
  evals = ST.make_eval_batches(cfg, tok)
  held = pairs.load(cfg, tok, "eval")
  assert sum(float(b["weight"].sum()) for b in evals) == len(held)


def test_streamed_pairs_resume_exactly(tok_path, data_cache, files, tok, monkeypatch):
  monkeypatch.setattr(ST, "WINDOW", 10)
  cfg = dpo_config(tok_path, data_cache, "jsonl", files["jsonl"], batch_size=4)
  it = ST.make_batch_iterator(cfg, tok)
  straight = take(it, 40)
  assert it.get_state()["processes"]["0"][0] >= 1, "the run should cross an epoch"
  assert_resumes(cfg, tok, straight, (1, 6, 17, 33))


def test_stream_refuses_precomputed_reference_and_builtin_pairs(tok_path, data_cache, files):
  cfg = dpo_config(tok_path, data_cache, "jsonl", files["jsonl"], **{"dpo.precompute_reference": True})
  with pytest.raises(UserError, match="precompute_reference"):
    ST.check(cfg)
  with pytest.raises(UserError, match="jsonl | parquet | hf_disk"):
    ST.check(dpo_config(tok_path, data_cache, "builtin", ""))


def epoch_pairs(batches):
  """Counter of (chosen, rejected) target ids of every pair of packed batches."""
  out = collections.Counter()
  for b in batches:
    for i in range(b["targets"].shape[0]):
      for g in range(b["weight"].shape[1]):
        if b["weight"][i, g]:
          on = lambda j: (b["target_pair"][i] == g) & (b["target_branch"][i] == j)
          out[tuple(tuple(b["targets"][i][on(j)].tolist()) for j in (1, 2))] += 1
  return out


def unpacked_pairs(ps):
  b = pairs.make_batch(ps, np.arange(len(ps)))
  return collections.Counter(tuple(tuple(b["targets"][i][b["target_branch"][i] == j].tolist()) for j in (1, 2))
                             for i in range(len(ps)))


def test_packed_stream_gives_each_pair_once_an_epoch_and_resumes(tok_path, data_cache, files, tok, monkeypatch):
  monkeypatch.setattr(ST, "WINDOW", 10)
  cfg = dpo_config(tok_path, data_cache, "jsonl", files["jsonl"], batch_size=4, **{"data.pair_rows": 2})
  it = ST.make_batch_iterator(cfg, tok)
  L = ST.pair_sizes(cfg)[0]
  epoch = []
  while (b := next(it)) and it.get_state()["processes"]["0"][0] == 0:  # a state in epoch 1: its first batch
    epoch.append(b)
  assert all(b["tokens"].shape == (2, L) and b["weight"].shape == (2, 4) for b in epoch)
  assert all(b["weight"].sum() <= 4 for b in epoch) and np.mean([b["weight"].sum() for b in epoch]) > 2.5
  assert epoch_pairs(epoch) == unpacked_pairs(pairs.load(cfg, tok, "train"))
  it.close()
  straight = take(ST.make_batch_iterator(cfg, tok), 40)
  assert_resumes(cfg, tok, straight, (1, 7, len(epoch) + 2))
  halves = [take(ST.make_batch_iterator(cfg, tok, p, 2), 3) for p in range(2)]  # 1 row, 2 pairs each
  assert all(b["tokens"].shape == (1, L) and b["weight"].shape == (1, 2) for h in halves for b in h)


def test_packed_cached_pairs_give_each_pair_once_an_epoch_and_split_over_processes(tok_path, data_cache, files, tok):
  cfg = dpo_config(tok_path, data_cache, "jsonl", files["jsonl"], batch_size=8,
                   **{"data.pair_rows": 4, "data.pipeline": "cache"})
  it = pairs.make_batches(cfg, tok, "train")
  ps = pairs.load(cfg, tok, "train")
  n = it._length(0)
  first = take(it, n + 3)
  assert epoch_pairs(first[:n]) == unpacked_pairs(ps)
  assert sum(b["weight"].sum() for b in first[:n]) == len(ps)
  halves = [take(pairs.make_batches(cfg, tok, "train", p, 2), n + 3) for p in range(2)]
  for whole, a, b in zip(first, *halves):
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k], err_msg=k)
  resumed = pairs.make_batches(cfg, tok, "train")
  resumed.set_state({"step": n + 1})
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(take(resumed, 2), first[n + 1:]) for k in a)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("fmt,pair_rows", [("jsonl", 0), ("parquet", 0), ("jsonl", 8)])
def test_dpo_trains_on_a_stream_and_resumes_as_one_run(base_run, tok_path, data_cache, files, tmp_path, fmt,
                                                       pair_rows):
  """Also packed (data.pair_rows=8: each step's 16 pairs in 8 rows, one a device)."""
  kw = {"batch_size": 16 if pair_rows else 8, "init_from": base_run, "optim.lr": 1e-3, "optim.schedule": "constant",
        "steps": 24, "checkpoint_every": 12, "eval_every": 24, "data.pair_rows": pair_rows}
  out = loop.train(dpo_config(tok_path, data_cache, fmt, files[fmt], **kw), str(tmp_path / "straight"))
  straight = losses(tmp_path / "straight")
  first, last = np.mean([straight[s] for s in range(1, 5)]), np.mean([straight[s] for s in range(21, 25)])
  print(fmt, pair_rows, "streamed DPO loss", first, "->", last, "eval", out["eval/loss"])
  assert last < 0.8 * first
  if fmt == "parquet":
    return
  loop.train(dpo_config(tok_path, data_cache, fmt, files[fmt], **{**kw, "steps": 12}), str(tmp_path / "resumed"))
  loop.train(dpo_config(tok_path, data_cache, fmt, files[fmt], **kw), str(tmp_path / "resumed"))
  assert losses(tmp_path / "resumed") == straight  # bit-identical
