"""Streamed pretraining and SFT batches (train/stream.py): deterministic, exactly resumable, sharded
by process, lossless packing, the same for any number of tokenizing workers, and a run that learns
from them."""
import itertools
import json
import os
import signal
import subprocess
import time

import ml_collections
import numpy as np
import pytest

from configs import sections
from model import tokenizer as T
from tests import _cli
from train import corpus
from train import loop
from train import sources as S
from train import stream as ST


def write_corpus(path, n=60, seed=0):
  """n jsonl documents of random lengths (up to 400 characters of the built-in prose)."""
  rng = np.random.default_rng(seed)
  prose = corpus.pretrain_documents(0, 200)
  with open(path, "w") as f:
    for i in range(n):
      text = " ".join(prose[j] for j in rng.integers(0, len(prose), 2))[:rng.integers(20, 400)]
      f.write(json.dumps({"text": f"doc {i}: {text}"}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("stream") / "c.jsonl")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return T.train_tokenizer(corpus.pretrain_documents(0, 300), 320, str(tmp_path_factory.mktemp("tok") / "t.model"))


def make_config(path, seed=0, batch_size=8):
  c = ml_collections.ConfigDict(dict(seq_len=32, batch_size=batch_size, seed=seed, objective="pretrain",
                                     eval_batches=2, model=dict(vocab_size=320)))
  c.data, c.tokenizer = sections.data(), sections.tokenizer()
  c.data.source, c.data.path, c.data.pipeline = "jsonl", path, "stream"
  return c


def docs_of(shard):
  return [doc for doc, _ in shard]


def take(it, n):
  return [next(it) for _ in range(n)]


def same(a, b):
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def assert_resumes(cfg, tok, straight, stops):
  """A stream restored from its state (through JSON) at each of `stops` gives the next 6 batches
  of `straight`, the batches of one unbroken stream."""
  it = ST.make_batch_iterator(cfg, tok)
  for stop in stops:
    take(it, stop - it.get_state()["step"])
    resumed = ST.make_batch_iterator(cfg, tok)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    assert same(take(resumed, 6), straight[stop:stop + 6]), stop


@pytest.fixture
def small_window(monkeypatch):
  monkeypatch.setattr(ST, "WINDOW", 12)  # windows (and epochs) end within a few batches


def test_batches_are_a_function_of_data_seed_and_step(corpus_path, tok, small_window):
  a = take(ST.make_batch_iterator(make_config(corpus_path), tok), 30)
  b = take(ST.make_batch_iterator(make_config(corpus_path), tok), 30)
  other = take(ST.make_batch_iterator(make_config(corpus_path, seed=1), tok), 30)
  assert same(a, b) and not same(a, other)
  assert a[0]["inputs"].shape == (8, 32) and a[0]["loss_mask"].dtype == np.float32
  assert all((x["segment_ids"] > 0).all() for x in a)  # concatenate-and-split: no padding


def test_resume_gives_the_batches_of_an_uninterrupted_run(corpus_path, tok, small_window):
  cfg = make_config(corpus_path)
  it = ST.make_batch_iterator(cfg, tok)
  straight = take(it, 60)  # > 1 epoch (~ 40 batches of 8 x 32 tokens), many windows
  assert it.get_state()["processes"]["0"][0] >= 1, "the run should cross an epoch"
  it = ST.make_batch_iterator(cfg, tok)
  for stop in (1, 7, 12, 39, 52):  # mid-window, window ends, across the epoch
    take(it, stop - it.get_state()["step"])
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint meta stores it
    resumed = ST.make_batch_iterator(cfg, tok)
    resumed.set_state(state)
    assert same(take(resumed, 8), straight[stop:stop + 8]), stop


def test_processes_read_disjoint_documents_whose_union_is_the_corpus(corpus_path):
  cfg = make_config(corpus_path)
  with open(corpus_path) as f:
    docs = [json.loads(line)["text"] for line in f]
  held_out = docs[::50]
  mine = [docs_of(S.shard_documents(cfg, "train", p, 3, 0)) for p in range(3)]
  assert sorted(itertools.chain(*mine)) == sorted(d for d in docs if d not in held_out)
  assert not set(mine[0]) & set(mine[1]) and not set(mine[1]) & set(mine[2])
  assert docs_of(S.shard_documents(cfg, "train", 1, 3, 5)) == mine[1][5:]


def test_a_tfds_shard_reads_its_records_only(corpus_path, tmp_path):
  cfg = make_config(corpus_path)
  cfg.data.source, cfg.data.cache_dir = "tfds", str(tmp_path)  # a local TFDS build of the jsonl file
  for split in ("train", "eval"):
    docs = S.load_documents(cfg, split)
    shards = [docs_of(S.shard_documents(cfg, split, p, 3)) for p in range(3)]
    assert [d for d in itertools.chain(*itertools.zip_longest(*shards)) if d is not None] == docs, split
    assert docs_of(S.shard_documents(cfg, split, 2, 3, start=4)) == shards[2][4:]


def test_packing_loses_no_token(corpus_path, tok):
  cfg = make_config(corpus_path)
  seq = cfg.seq_len
  docs = docs_of(S.shard_documents(cfg, "train", 1, 2, 0))
  ids = [tok.encode(d, add_bos=True, add_eos=True) for d in docs]
  # Plain reference: document k contributes inputs ids[:-1], targets ids[1:], positions 0.. restarting
  # at each document and each row; the stream goes on into the next epoch.
  inputs, targets, positions = [], [], []
  for doc_ids in ids + ids:
    inputs += doc_ids[:-1]
    targets += doc_ids[1:]
    positions += list(range(len(doc_ids) - 1))
  rows = []
  for row, (epoch, _, _, _) in ST.packed_rows(cfg, tok, 1, 2, ST.FIRST):
    rows.append(row.copy())
    if epoch:
      break
  n = len(rows) * seq
  assert n >= sum(len(i) - 1 for i in ids)
  got = np.concatenate(rows, axis=1)  # [5, n]
  assert got[0].tolist() == inputs[:n] and got[1].tolist() == targets[:n]
  assert (got[4] == 1).all() and (got[2] > 0).all()
  starts = np.flatnonzero(np.array(positions[:n]) == 0)
  want_pos = np.array(positions[:n])
  for r in range(len(rows)):  # a document cut at a row end restarts at position 0 in the next row
    first = r * seq
    following = starts[starts > first]
    end = following[0] if len(following) else n
    want_pos[first:end] -= want_pos[first]
  assert got[3].tolist() == want_pos.tolist()


def test_a_window_is_a_permutation_of_its_rows(corpus_path, tok, small_window):
  cfg = make_config(corpus_path)
  plain = [r.tobytes() for r, _ in itertools.islice(ST.packed_rows(cfg, tok, 0, 1, ST.FIRST), 24)]
  shuffled = [r.tobytes() for r, _ in itertools.islice(ST.shuffled_rows(cfg, tok, 0, 1, ST.FIRST_STATE), 24)]
  assert sorted(plain[:12]) == sorted(shuffled[:12]) and sorted(plain[12:]) == sorted(shuffled[12:])
  assert plain != shuffled


def test_eval_batches_are_sliced_by_process(corpus_path, tok):
  cfg = make_config(corpus_path)
  whole = ST.make_eval_batches(cfg, tok)
  halves = [ST.make_eval_batches(cfg, tok, p, 2) for p in range(2)]
  assert len(whole) == 2 and whole[0]["inputs"].shape == (8, 32)  # config.eval_batches
  for s, k in itertools.product(range(2), whole[0]):
    np.testing.assert_array_equal(np.concatenate([halves[0][s][k], halves[1][s][k]]), whole[s][k])


@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_training_on_a_stream_learns(tiny_config, tmp_path, corpus_path, chats_path, objective):
  c = tiny_config(steps=60, eval_every=60, checkpoint_every=60, log_every=10, objective=objective)
  c.data.source, c.data.pipeline = "jsonl", "stream"
  c.data.path = corpus_path if objective == "pretrain" else chats_path
  c.optim.warmup_steps = 10
  c.tokenizer.max_training_chars = 200_000
  out = loop.train(c, str(tmp_path / "run"))
  first = _cli.train_losses(tmp_path / "run")[10]
  print(objective, "stream loss", first, "->", out["train/loss"], "eval", out["eval/loss"])
  assert out["train/loss"] < 0.8 * first


@pytest.fixture(scope="module")
def chats_path(tmp_path_factory):
  """60 prompt/completion records of 2-30 words: some longer than seq_len=64 tokens."""
  rng = np.random.default_rng(1)
  words = " ".join(corpus.pretrain_documents(0, 50)).split()
  path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
  with open(path, "w") as f:
    for i in range(60):
      answer = " ".join(words[j] for j in rng.integers(0, len(words), rng.integers(1, 28)))
      f.write(json.dumps({"prompt": f"question {i}?", "completion": answer}) + "\n")
  return str(path)


def sft_config(path):
  c = make_config(path)
  c.objective, c.seq_len, c.batch_size = "sft", 64, 4
  return c


def test_sft_stream_resumes_exactly(chats_path, tok, small_window):
  cfg = sft_config(chats_path)
  it = ST.make_batch_iterator(cfg, tok)
  straight = take(it, 40)
  assert it.get_state()["processes"]["0"][0] >= 1, "the run should cross an epoch"
  assert any((b["segment_ids"] == 0).any() for b in straight)  # best fit pads
  assert_resumes(cfg, tok, straight, (1, 5, 17, 30))


def test_sft_windows_keep_every_conversation_whole(chats_path, tok, small_window):
  cfg = sft_config(chats_path)
  docs = docs_of(S.shard_documents(cfg, "train", 0, 1))
  want, dropped = [], 0
  for doc in docs:  # reference: every conversation of <= seq_len positions, whole; the others dropped
    ids, mask = T.apply_chat_template(tok, doc, "chatml")
    if len(ids) - 1 > cfg.seq_len:
      dropped += 1
    else:
      want.append((tuple(ids[:-1]), tuple(mask[1:])))
  assert dropped and want
  got, ends = [], []
  for rows, start, end in itertools.islice(ST.record_windows(cfg, tok, 0, 1, ST.FIRST), 5):
    ends.append(end[:3])
    for row in rows:
      for seg in set(row[2].tolist()) - {0}:
        at = row[2] == seg
        assert row[3][at].tolist() == list(range(at.sum()))  # one piece, positions 0..
        got.append((tuple(row[0][at].tolist()), tuple(row[4][at].tolist())))
  assert ends == [(0, 12, 0), (0, 24, 0), (0, 36, 0), (0, 48, 0), (0, 58, 0)]  # 58 train conversations
  assert sorted(got) == sorted(want)


@pytest.mark.slow
def test_two_processes_stream_killed_and_resumed_equal_uninterrupted(tmp_path, data_cache):
  path = write_corpus(tmp_path / "c.jsonl", n=600)
  flags = ["--config.data.source=jsonl", f"--config.data.path={path}", "--config.data.pipeline=stream",
           "--config.tokenizer.max_training_chars=200000", "--config.log_every=1", "--config.eval_every=0",
           "--config.checkpoint_every=1000", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
           "--config.steps=40"]

  def two_processes(workdir, kill_after=0):
    """Two processes training in `workdir`; with kill_after, SIGTERM to process 0 once that many
    steps are logged (the stop flag is shared: both save the same step and exit)."""
    port = _cli.free_port()
    procs = [subprocess.Popen(
        _cli.command(str(workdir), data_cache, *flags, f"--coordinator=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}"),
        env=_cli.env(2), cwd=_cli.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
    while kill_after and procs[0].poll() is None and time.time() < deadline:
      if metrics.exists() and len(_cli.train_losses(workdir)) >= kill_after:
        procs[0].send_signal(signal.SIGTERM)
        break
      time.sleep(0.2)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-3000:]
    return outs

  outs = two_processes(tmp_path / "straight")
  assert "streaming" in outs[0] and "reads documents i % 2 == 0" in outs[0]
  two_processes(tmp_path / "resumed", kill_after=5)
  saved = [int(d) for d in os.listdir(tmp_path / "resumed" / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and 5 <= saved[0] < 40, saved
  outs = two_processes(tmp_path / "resumed")
  assert f"resumed from step {saved[0]}" in outs[0]
  a, b = _cli.train_losses(tmp_path / "straight"), _cli.train_losses(tmp_path / "resumed")
  assert sorted(a) == sorted(b) == list(range(1, 41))
  assert [b[s] for s in a] == [a[s] for s in a]  # bit-identical


def test_batches_are_the_same_for_any_number_of_workers(corpus_path, chats_path, tok, small_window):
  """Records tokenized in 1 or 2 worker processes (data.workers) give the batches of the trainer's
  own thread (0), also after a resume."""
  for cfg, counts in ((make_config(corpus_path), (0, 2)), (sft_config(chats_path), (0, 1))):
    runs = []
    for n in counts:
      cfg.data.workers = n
      it = ST.make_batch_iterator(cfg, tok)
      first = take(it, 9)
      state = json.loads(json.dumps(it.get_state()))
      rest = take(it, 16)
      it.set_state(state)  # the workers stay; the abandoned window's chunks are dropped
      again = take(it, 6)
      it.close()
      runs.append(first + rest)
      assert same(again, rest[:6]), (cfg.objective, n)
    assert all(same(r, runs[0]) for r in runs[1:]), cfg.objective
