"""A run keeps its tokenizer (train/run_tokenizer.py, train/init_source.py `tokenizer`): stored in
DIR/tokenizer/ when it starts, then read by sampling, evaluation, resumption and `init_from`, whatever
happens to its data file afterwards; a tokenizer.path that differs from init_from's is an error."""
import json
import os
import shutil

import pytest

from configs import dpo_tiny, pretrain_tiny, tools
from configs.errors import UserError
from eval import sample
from model import tokenizer as tokenizer_lib
from train import corpus, init_source, loop, rundir, run_tokenizer, stage

TEXT = "What is 17 + 25? 17 + 25 = 42. <answer>42</answer>"


def write_corpus(path: str, docs) -> str:
  with open(path, "w") as f:
    f.write("\n\n".join(docs) + "\n")
  return path


def problems(seed: int, n: int) -> list:
  return [corpus.problem_text(p) for p in corpus.train_problems(seed, n)]


def text_config(cache: str, path: str, **kw):
  """The tiny model (vocab 320) pretraining two steps on a text file."""
  c = pretrain_tiny.get_config()
  c.model.vocab_size = 320
  c.data.source, c.data.path, c.data.cache_dir = "text", path, cache
  c.seq_len, c.batch_size, c.steps = 32, 8, 2
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 1, 0, 2, 1
  c.async_checkpoints = False
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  """(workdir, config) of a finished run trained on corpus A (arithmetic problems)."""
  root = tmp_path_factory.mktemp("run_tokenizer")
  path = write_corpus(str(root / "a.txt"), problems(0, 400))
  c = text_config(str(root / "cache"), path)
  workdir = str(root / "a")
  loop.train(c, workdir)
  return workdir, c


def corpus_b_tokenizer(tmp_path) -> tokenizer_lib.Tokenizer:
  """A tokenizer of another corpus (English prose) and the same vocabulary size."""
  return tokenizer_lib.train_tokenizer(corpus.english_text(), 320, str(tmp_path / "b.model"))


def greedy(workdir: str, capsys) -> str:
  a = tools.sample()
  a.prompts, a.temperature, a.max_new_tokens = (TEXT,), 0.0, 8
  sample.print_samples(workdir, a)
  return capsys.readouterr().out


def test_the_run_stored_its_tokenizer_before_training(run_a):
  workdir, c = run_a
  stored = run_tokenizer.stored(workdir)
  assert os.path.isfile(os.path.join(workdir, "tokenizer", run_tokenizer.SENTENCEPIECE))
  assert stored.model_proto == rundir.load_run(workdir).tokenizer.model_proto
  assert stored.vocab_size == 320 and stored.decode(stored.encode(TEXT)) == TEXT


def test_init_from_uses_the_stored_vocabulary_not_its_own_data(run_a, tmp_path):
  workdir, c = run_a
  other = text_config(c.data.cache_dir, write_corpus(str(tmp_path / "b.txt"), corpus.english_text()),
                      init_from=workdir)
  run = stage.start_run(other, str(tmp_path / "b"), lambda cfg: None)
  mine = run_tokenizer.stored(workdir)
  assert run.tokenizer.encode(TEXT) == mine.encode(TEXT)
  assert run.tokenizer_note == f"tokenizer of {workdir}"
  assert run_tokenizer.stored(str(tmp_path / "b")).model_proto == mine.model_proto
  assert corpus_b_tokenizer(tmp_path).encode(TEXT) != mine.encode(TEXT)  # what init_from used to swap in


def test_a_differing_tokenizer_path_is_an_error_naming_both(run_a, tmp_path):
  workdir, c = run_a
  b = corpus_b_tokenizer(tmp_path)
  fresh = text_config(c.data.cache_dir, c.data.path, init_from=workdir)
  fresh.tokenizer.path = b.path
  with pytest.raises(UserError, match=f"tokenizer.path={b.path} differs .*init_from={workdir}"):
    init_source.tokenizer(fresh, str(tmp_path / "c"))
  fresh.tokenizer.path = os.path.join(workdir, "tokenizer", run_tokenizer.SENTENCEPIECE)  # the same one
  assert init_source.tokenizer(fresh, str(tmp_path / "c"))[0].model_proto == \
      run_tokenizer.stored(workdir).model_proto
  resumed = text_config(c.data.cache_dir, c.data.path)
  resumed.tokenizer.path = b.path
  with pytest.raises(UserError, match=f"tokenizer.path={b.path} differs .*this run started with"):
    init_source.tokenizer(resumed, workdir)


def test_a_run_from_before_stored_tokenizers_rebuilds_it_from_its_config(run_a, tmp_path):
  workdir, c = run_a
  old = str(tmp_path / "old")
  shutil.copytree(workdir, old)
  shutil.rmtree(os.path.join(old, "tokenizer"))
  assert rundir.load_run(old).tokenizer.model_proto == run_tokenizer.stored(workdir).model_proto


def test_sampling_resuming_and_init_from_survive_appending_to_and_moving_the_data(run_a, tmp_path, capsys):
  workdir, c = run_a
  before, ids = greedy(workdir, capsys), run_tokenizer.stored(workdir).encode(TEXT)
  original = open(c.data.path).read()
  try:
    with open(c.data.path, "a") as f:  # another size and mtime: the data cache would train anew
      f.write("\n\n" + "\n\n".join(corpus.english_text()) + "\n")
    assert greedy(workdir, capsys) == before
    assert init_source.tokenizer(c, workdir)[0].encode(TEXT) == ids  # resuming
    os.rename(c.data.path, c.data.path + ".moved")
    assert greedy(workdir, capsys) == before
    assert rundir.load_run(workdir).tokenizer.encode(TEXT) == ids
    assert init_source.tokenizer(text_config(c.data.cache_dir, "", init_from=workdir), str(tmp_path / "d"))[0] \
        .encode(TEXT) == ids
  finally:
    if os.path.exists(c.data.path + ".moved"):
      os.rename(c.data.path + ".moved", c.data.path)
    write_corpus(c.data.path, [original.rstrip("\n")])


def dpo_config(workdir: str, cache: str, tmp_path):
  """DPO from `workdir` on a JSONL file of 40 pairs of its own, no tokenizer.path."""
  pairs = str(tmp_path / "pairs.jsonl")
  with open(pairs, "w") as f:
    for a, b in [(i, 2 * i + 1) for i in range(40)]:
      f.write(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"<answer>{a + b}</answer>",
                          "rejected": f"<answer>{a + b + 1}</answer>"}) + "\n")
  d = dpo_tiny.get_config()
  d.model.vocab_size = 320
  d.init_from, d.data.source, d.data.path, d.data.cache_dir = workdir, "jsonl", pairs, cache
  d.seq_len, d.batch_size, d.steps = 96, 8, 1  # every pair fits (longer ones are dropped)
  d.log_every, d.eval_every, d.checkpoint_every, d.eval_batches = 1, 0, 1, 1
  d.async_checkpoints = False
  return d


def test_dpo_on_its_own_pairs_takes_the_tokenizer_of_init_from(run_a, tmp_path):
  workdir, c = run_a
  run = stage.start_run(dpo_config(workdir, c.data.cache_dir, tmp_path), str(tmp_path / "dpo"), lambda cfg: None)
  assert run.tokenizer.model_proto == run_tokenizer.stored(workdir).model_proto
  d = dpo_config("", c.data.cache_dir, tmp_path)  # nothing to take it from: the error says what to give
  with pytest.raises(UserError, match="config.objective='dpo' trains no tokenizer"):
    init_source.tokenizer(d, str(tmp_path / "dpo2"))


@pytest.mark.slow
def test_dpo_on_its_own_pairs_after_a_run_needs_no_tokenizer_path(run_a, tmp_path):
  workdir, c = run_a
  out = loop.train(dpo_config(workdir, c.data.cache_dir, tmp_path), str(tmp_path / "dpo"))
  assert out["step"] == 1
  assert run_tokenizer.stored(str(tmp_path / "dpo")).model_proto == run_tokenizer.stored(workdir).model_proto
