"""Data pipeline: packing, per-process slicing, resumable state, file / TFDS sources."""
import concurrent.futures
import importlib.util
import json
import math
import os
import sys

import grain
import ml_collections
import numpy as np
import pytest

from model import tokenizer as T
from train import corpus
from train import data as D


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "t.model")
  return T.train_tokenizer(corpus.pretrain_documents(0, 300), 320, path)


def make_config(cache, tok=None, objective="pretrain", batch_size=8, **data):
  c = ml_collections.ConfigDict(dict(seq_len=64, batch_size=batch_size, seed=0,
                                     objective=objective, model=dict(vocab_size=320)))
  c.data, c.tokenizer = D.default_data_config(), D.default_tokenizer_config()
  c.data.cache_dir, c.data.num_documents = str(cache), 200
  c.data.update(data)
  c.tokenizer.path = tok.path if tok else ""
  return c


def read_rows(path):
  src = grain.sources.ArrayRecordDataSource([path])
  return [D.parse_row(src[i]) for i in range(len(src))]


def test_pack_rows_by_hand():
  examples = [([1, 2, 3, 4], [1] * 4), ([5, 6, 7, 8], [0, 0, 1, 1]), (list(range(10, 22)), [1] * 12)]
  rows = list(D.pack_rows(examples, seq_len=8, pad_id=0))
  assert [r[2].tolist() for r in rows] == [[1, 1, 1, 2, 2, 2, 0, 0], [1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]
  assert rows[0][3].tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
  assert rows[0][0].tolist() == [1, 2, 3, 5, 6, 7, 0, 0] and rows[0][1].tolist() == [2, 3, 4, 6, 7, 8, 0, 0]
  assert rows[0][4].tolist() == [1, 1, 1, 0, 1, 1, 0, 0]
  assert rows[1][0].tolist() == list(range(10, 18)) and rows[2][1].tolist() == [19, 20, 21, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_packing_keeps_every_token_once(tok, tmp_path, objective):
  c = make_config(tmp_path, tok, objective)
  rows = read_rows(D.prepare_split(c, tok, "train"))
  got = {k: [] for k in ("inputs", "targets", "loss_mask")}
  segments = 0
  for r in rows:
    assert all(v.shape == (64,) for v in r.values())
    seg, pad = r["segment_ids"], r["segment_ids"] == 0
    assert np.all(np.diff(seg[~pad]) >= 0) and (not pad.any() or pad[np.argmax(pad):].all())
    assert not r["loss_mask"][pad].any() and not r["positions"][pad].any()
    for s in range(1, seg.max() + 1):
      sel = seg == s
      np.testing.assert_array_equal(r["positions"][sel], np.arange(sel.sum()))
      for k in got:
        got[k].append(r[k][sel])
    segments += seg.max()
  want = {k: [] for k in got}
  expected_segments = 0
  for doc in D.load_documents(c, "train"):  # independent re-tokenization
    if objective == "pretrain":
      ids = tok.encode(doc, add_bos=True, add_eos=True)
      mask = [1] * len(ids)
    else:
      ids, mask = T.apply_chat_template(tok, doc, "chatml")
    want["inputs"].append(ids[:-1]), want["targets"].append(ids[1:]), want["loss_mask"].append(mask[1:])
    expected_segments += math.ceil((len(ids) - 1) / 64)
  for k in got:
    np.testing.assert_array_equal(np.concatenate(got[k]), np.concatenate(want[k]))
  assert segments == expected_segments
  if objective == "sft":  # the prompt is masked
    assert 0 < np.concatenate(got["loss_mask"]).mean() < 0.7


def test_processes_see_the_global_batch_and_state_resumes(tok, tmp_path):
  c = make_config(tmp_path, tok)
  one = D.make_batch_iterator(c, tok)
  parts = [D.make_batch_iterator(c, tok, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(3):
    g, halves = next(one), [next(it) for it in parts]
    assert g["inputs"].shape == (8, 64) and halves[0]["inputs"].shape == (4, 64)
    for k in D.FIELDS:
      np.testing.assert_array_equal(g[k], np.concatenate([h[k] for h in halves]))
  state = json.loads(json.dumps(one.get_state()))
  want = [next(one) for _ in range(2)]
  again = D.make_batch_iterator(c, tok)
  again.set_state(state)
  for w, g in zip(want, [next(again) for _ in range(2)]):
    for k in D.FIELDS:
      np.testing.assert_array_equal(w[k], g[k])
  with pytest.raises(ValueError, match="batch_size"):
    D.make_batch_iterator(make_config(tmp_path, tok, batch_size=7), tok, process_count=2)


def test_text_source_epochs_are_reshuffled(tok, tmp_path):
  text = "\n\n".join(f"Paragraph {i}." + " word" * (i % 7 * 2) for i in range(40))
  (tmp_path / "a.txt").write_text(text + "\n")
  c = make_config(tmp_path, tok, batch_size=1, source="text", path=str(tmp_path / "*.txt"))
  assert D.load_documents(c, "eval") == ["Paragraph 0."]
  assert len(D.load_documents(c, "train")) == 39
  c.data.max_documents = 10
  assert len(D.load_documents(c, "train")) == 9
  c.data.max_documents = 0
  n = len(read_rows(D.prepare_split(c, tok, "train")))
  it = D.make_batch_iterator(c, tok)
  stream = [next(it)["inputs"][0].tobytes() for _ in range(2 * n)]
  first, second = stream[:n], stream[n:]
  assert n > 5 and sorted(first) == sorted(second) and len(set(first)) == n and first != second


def test_eval_batches_padded_and_sliced(tok, tmp_path):
  c = make_config(tmp_path, tok, "sft")
  docs = D.load_documents(c, "eval")
  assert docs == [corpus.conversation(p)["messages"] for p in corpus.heldout_problems(4)]
  full = D.make_eval_batches(c, tok)
  halves = [D.make_eval_batches(c, tok, p, 2) for p in (0, 1)]
  assert len(full) == 1 and full[0]["inputs"].shape == (8, 64)
  real = full[0]["segment_ids"].max(axis=1) > 0
  assert real.tolist() == [True] * 4 + [False] * 4 and not full[0]["loss_mask"][~real].any()
  for k in D.FIELDS:
    np.testing.assert_array_equal(full[0][k], np.concatenate([h[0][k] for h in halves]))
  assert D.make_eval_batches(c, tok, max_batches=0) == []


def test_jsonl_errors_name_file_and_line(tok, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "fine"}\n\n{"text": "ok"\n')
  c = make_config(tmp_path, tok, source="jsonl", path=str(path))
  with pytest.raises(ValueError, match=f"{path}:3: invalid JSON"):
    D.load_documents(c, "train")
  path.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
  with pytest.raises(ValueError, match=f"{path}:2: .*'text'"):
    D.load_documents(c, "train")
  path.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
  with pytest.raises(ValueError, match=f"{path}:1: .*'bot'"):
    D.load_documents(make_config(tmp_path, tok, "sft", source="jsonl", path=str(path)), "train")


def test_tfds_builder_from_local_jsonl(tok, tmp_path):
  train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
  train.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"}) + "\n"
                           for i in range(30)))
  evals.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n")
  c = make_config(tmp_path / "cache", tok, "sft", source="tfds", path=str(train), eval_path=str(evals))
  docs = D.load_documents(c, "train")
  assert sorted(d[0]["content"] for d in docs) == sorted(f"What is {i} + 1?" for i in range(30))
  assert D.load_documents(c, "eval") == [[{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]]
  paths = D.prepare(c)
  assert os.path.isfile(paths["train"]) and paths["tokenizer"] == tok.path
  assert D.prepare(c) == paths  # reused, not rebuilt
  data_dir = next((tmp_path / "cache" / "tfds").iterdir())
  builder = D.KilnFiles(data_dir=data_dir, file_format="array_record")
  assert len(builder.as_data_source()["train"]) == 30
  by_name = make_config(tmp_path / "cache", tok, "sft", source="tfds", tfds_name="kiln_files",
                        tfds_data_dir=str(data_dir), tfds_eval_split="eval")
  assert D.load_documents(by_name, "train") == docs  # tfds.data_source(name, ...) reads it too
  assert "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None


def test_tokenizer_is_trained_once_and_cached(tmp_path, monkeypatch):
  (tmp_path / "en.txt").write_text("\n\n".join(corpus.english_text()[:300]))
  c = make_config(tmp_path, source="text", path=str(tmp_path / "en.txt"))
  tok = D.load_or_train_tokenizer(c)
  assert tok.vocab_size == 320 and tok.path.startswith(str(tmp_path))
  monkeypatch.setattr(T, "train_tokenizer", None)  # a second call must not train
  assert D.load_or_train_tokenizer(c).model_proto == tok.model_proto
  c.model.vocab_size = 300
  c.tokenizer.path = tok.path
  with pytest.raises(ValueError, match="model.vocab_size"):
    D.load_or_train_tokenizer(c)


def test_concurrent_preparation_is_safe(tok, tmp_path):
  (tmp_path / "a.txt").write_text("\n\n".join(f"Document number {i} is here." for i in range(60)))
  c = make_config(tmp_path / "cache", tok, source="text", path=str(tmp_path / "a.txt"))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    paths = list(pool.map(lambda _: D.prepare_split(c, tok, "train"), range(2)))
  assert paths[0] == paths[1] and len(read_rows(paths[0])) > 0
  assert os.listdir(tmp_path / "cache" / "packed") == [os.path.basename(os.path.dirname(paths[0]))]
