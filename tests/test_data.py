"""Data pipeline: packing, streaming preparation, per-process slicing, resumable state, sources."""
import concurrent.futures
import importlib.util
import json
import os
import sys

import grain
import ml_collections
import numpy as np
import pytest

from configs import sections
from model import tokenizer as T
from train import corpus
from train import data as D
from train import packing as P
from train import sources as S


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "t.model")
  return T.train_tokenizer(corpus.pretrain_documents(0, 300), 320, path)


def make_config(cache, tok=None, objective="pretrain", batch_size=8, **data):
  c = ml_collections.ConfigDict(dict(seq_len=64, batch_size=batch_size, seed=0,
                                     objective=objective, model=dict(vocab_size=320)))
  c.data, c.tokenizer = sections.data(), sections.tokenizer()
  c.data.cache_dir, c.data.num_documents = str(cache), 200
  c.data.update(data)
  c.tokenizer.path = tok.path if tok else ""
  return c


def read_rows(path):
  src = grain.sources.ArrayRecordDataSource([path])
  return [P.parse_row(src[i]) for i in range(len(src))]


def ex(start, n):
  """An example of n predicted positions: ids start .. start+n, mask 1."""
  return list(range(start, start + n + 1)), [1] * (n + 1)


def test_pack_concat_by_hand():
  examples = [ex(1, 4), ([6, 7, 8], [0, 1, 1]), ex(10, 11)]
  rows = list(P.pack_rows(examples, seq_len=8, pad_id=0, split_documents=True))
  assert [r[2].tolist() for r in rows] == [[1, 1, 1, 1, 2, 2, 3, 3], [1] * 8, [1] + [0] * 7]
  assert rows[0][3].tolist() == [0, 1, 2, 3, 0, 1, 0, 1] and rows[1][3].tolist() == list(range(8))
  assert rows[0][0].tolist() == [1, 2, 3, 4, 6, 7, 10, 11] and rows[0][1].tolist() == [2, 3, 4, 5, 7, 8, 11, 12]
  assert rows[0][4].tolist() == [1, 1, 1, 1, 1, 1, 1, 1]
  assert rows[1][0].tolist() == list(range(12, 20)) and rows[2][:2, :2].tolist() == [[20, 0], [21, 0]]
  assert rows[2][3:].sum() == 1  # padding: position 0, mask 0


def test_pack_best_fit_by_hand():
  examples = [ex(100, 5), ex(200, 6), ex(300, 3), ex(400, 2), ex(500, 8), ex(600, 3)]
  rows = list(P.pack_rows(examples, seq_len=8, pad_id=0, buffer=3))
  firsts = [[int(r[0][r[3] == 0][s]) for s in range(r[2].max())] for r in rows]
  assert firsts == [[100, 300], [200, 400], [500], [600]]
  assert [r[2].tolist() for r in rows][:3] == [[1] * 5 + [2] * 3, [1] * 6 + [2] * 2, [1] * 8]
  assert rows[3][2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and rows[3][3].tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
  assert rows[1][4].tolist() == [1] * 8 and not rows[3][4][3:].any()
  with pytest.raises(ValueError, match="11 positions"):  # a conversation is never split: fit() it first
    list(P.pack_rows([ex(500, 11)], seq_len=8))


def next_fit_rows(lengths, seq_len):
  rows, fill = 0, seq_len
  for n in lengths:
    for k in [seq_len] * (n // seq_len) + [n % seq_len] * bool(n % seq_len):
      rows, fill = (rows + 1, k) if fill + k > seq_len else (rows, fill + k)
  return rows


@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_packing_keeps_every_token_once(tok, tmp_path, objective):
  c = make_config(tmp_path, tok, objective)
  c.seq_len = L = 64 if objective == "pretrain" else 192  # sft: 14 of 200 conversations are longer
  path = D.prepare_split(c, tok, "train")
  rows = read_rows(path)
  got = []  # per segment: [3, k] inputs, targets, loss_mask
  for r in rows:
    assert all(v.shape == (L,) for v in r.values())
    seg, pad = r["segment_ids"], r["segment_ids"] == 0
    assert np.all(np.diff(seg[~pad]) == (np.diff(seg[~pad]) > 0)) and (not pad.any() or pad[np.argmax(pad):].all())
    assert not r["loss_mask"][pad].any() and not r["positions"][pad].any()
    for s in range(1, seg.max() + 1):
      sel = seg == s
      np.testing.assert_array_equal(r["positions"][sel], np.arange(sel.sum()))
      got.append(np.stack([r["inputs"][sel], r["targets"][sel], r["loss_mask"][sel]]).astype(np.int64))
  want = []  # per document, independently re-tokenized
  for doc in S.load_documents(c, "train"):
    if objective == "pretrain":
      ids = tok.encode(doc, add_bos=True, add_eos=True)
      mask = [1] * len(ids)
    else:
      ids, mask = T.apply_chat_template(tok, doc, "chatml")
    want.append(np.array([ids[:-1], ids[1:], mask[1:]], np.int64))
  meta = json.load(open(os.path.join(os.path.dirname(path), "meta.json")))
  assert meta["documents"] == len(want) and meta["rows"] == len(rows)
  if objective == "pretrain":  # documents in order, cut only at row ends; every row full but the last
    np.testing.assert_array_equal(np.concatenate(got, 1), np.concatenate(want, 1))
    assert all((r["segment_ids"] > 0).all() for r in rows[:-1])
    assert len(want) <= len(got) < len(want) + len(rows)
  else:  # whole conversations that fit a row, in any order; longer ones dropped and counted
    fits = [w for w in want if w.shape[1] <= L]
    assert sorted(g.tobytes() for g in got) == sorted(w.tobytes() for w in fits)
    assert meta["dropped"] == len(want) - len(fits) > 0 and meta["truncated"] == 0
    lengths = [w.shape[1] for w in fits]
    assert len(rows) < 0.9 * next_fit_rows(lengths, L)
    assert 0 < np.concatenate(got, 1)[2].mean() < 0.7  # the prompt is masked
  assert meta["fill"] > (0.99 if objective == "pretrain" else 0.8)


def test_processes_see_the_global_batch_and_state_resumes(tok, tmp_path):
  c = make_config(tmp_path, tok)
  one = D.make_batch_iterator(c, tok)
  parts = [D.make_batch_iterator(c, tok, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(3):
    g, halves = next(one), [next(it) for it in parts]
    assert g["inputs"].shape == (8, 64) and halves[0]["inputs"].shape == (4, 64)
    for k in P.FIELDS:
      np.testing.assert_array_equal(g[k], np.concatenate([h[k] for h in halves]))
  state = json.loads(json.dumps(one.get_state()))
  want = [next(one) for _ in range(2)]
  again = D.make_batch_iterator(c, tok)
  again.set_state(state)
  for w, g in zip(want, [next(again) for _ in range(2)]):
    for k in P.FIELDS:
      np.testing.assert_array_equal(w[k], g[k])
  with pytest.raises(ValueError, match="batch_size"):
    D.make_batch_iterator(make_config(tmp_path, tok, batch_size=7), tok, process_count=2)


def test_text_source_epochs_are_reshuffled(tok, tmp_path):
  text = "\n\n".join(f"Paragraph {i}." + " word" * (i % 7 * 2) for i in range(40))
  (tmp_path / "a.txt").write_text(text + "\n")
  c = make_config(tmp_path, tok, batch_size=1, source="text", path=str(tmp_path / "*.txt"))
  assert S.load_documents(c, "eval") == ["Paragraph 0."]
  assert len(S.load_documents(c, "train")) == 39
  c.data.max_documents = 10
  assert len(S.load_documents(c, "train")) == 9
  c.data.max_documents = 0
  n = len(read_rows(D.prepare_split(c, tok, "train")))
  it = D.make_batch_iterator(c, tok)
  stream = [next(it)["inputs"][0].tobytes() for _ in range(2 * n)]
  first, second = stream[:n], stream[n:]
  assert n > 5 and sorted(first) == sorted(second) and len(set(first)) == n and first != second


def test_eval_batches_padded_and_sliced(tok, tmp_path):
  c = make_config(tmp_path, tok, "sft")
  c.seq_len = 96  # one held-out conversation per row (column-worked solutions outgrow 64 tokens)
  docs = S.load_documents(c, "eval")
  assert docs == [corpus.conversation(p)["messages"] for p in corpus.heldout_problems(4)]
  full = D.make_eval_batches(c, tok)
  halves = [D.make_eval_batches(c, tok, p, 2) for p in (0, 1)]
  assert len(full) == 1 and full[0]["inputs"].shape == (8, 96)
  real = full[0]["segment_ids"].max(axis=1) > 0
  assert real.tolist() == [True] * 4 + [False] * 4 and not full[0]["loss_mask"][~real].any()
  for k in P.FIELDS:
    np.testing.assert_array_equal(full[0][k], np.concatenate([h[0][k] for h in halves]))
  assert D.make_eval_batches(c, tok, max_batches=0) == []


def test_jsonl_errors_name_file_and_line(tok, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "fine"}\n\n{"text": "ok"\n')
  c = make_config(tmp_path, tok, source="jsonl", path=str(path))
  with pytest.raises(ValueError, match=f"{path}:3: invalid JSON"):
    S.load_documents(c, "train")
  path.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
  with pytest.raises(ValueError, match=f"{path}:2: .*'text'"):
    S.load_documents(c, "train")
  path.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
  with pytest.raises(ValueError, match=f"{path}:1: .*'bot'"):
    S.load_documents(make_config(tmp_path, tok, "sft", source="jsonl", path=str(path)), "train")


def test_tfds_builder_from_local_jsonl(tok, tmp_path):
  train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
  train.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"}) + "\n"
                           for i in range(30)))
  evals.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n")
  c = make_config(tmp_path / "cache", tok, "sft", source="tfds", path=str(train), eval_path=str(evals))
  docs = S.load_documents(c, "train")
  assert sorted(d[0]["content"] for d in docs) == sorted(f"What is {i} + 1?" for i in range(30))
  assert S.load_documents(c, "eval") == [[{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]]
  paths = D.prepare(c)
  assert os.path.isfile(paths["train"]) and paths["tokenizer"] == tok.path
  assert D.prepare(c) == paths  # reused, not rebuilt
  data_dir = next((tmp_path / "cache" / "tfds").iterdir())
  builder = S.KilnFiles(data_dir=data_dir, file_format="array_record")
  assert len(builder.as_data_source()["train"]) == 30
  by_name = make_config(tmp_path / "cache", tok, "sft", source="tfds", tfds_name="kiln_files",
                        tfds_data_dir=str(data_dir), tfds_eval_split="eval")
  assert S.load_documents(by_name, "train") == docs  # tfds.data_source(name, ...) reads it too
  assert S.fingerprint(by_name, "train")["files"]  # keyed by the dataset's files, not its records
  assert os.path.isfile(D.prepare_split(by_name, tok, "train"))
  assert "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None


def test_tokenizer_is_trained_once_and_cached(tmp_path, monkeypatch):
  (tmp_path / "en.txt").write_text("\n\n".join(corpus.english_text()[:300]))
  c = make_config(tmp_path, source="text", path=str(tmp_path / "en.txt"))
  tok = D.load_or_train_tokenizer(c)
  assert tok.vocab_size == 320 and tok.path.startswith(str(tmp_path))
  c.tokenizer.max_training_chars = 20000
  capped = D.load_or_train_tokenizer(c)  # another corpus, another tokenizer
  assert capped.path != tok.path and capped.model_proto != tok.model_proto
  monkeypatch.setattr(T, "train_tokenizer", None)  # a second call must not train
  assert D.load_or_train_tokenizer(c).model_proto == capped.model_proto
  c.tokenizer.max_training_chars = sections.TOKENIZER_TRAINING_CHARS
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


def test_first_chars():
  assert list(D.first_chars(iter(["abc", "defg", "hi"]), 5)) == ["abc", "de"]
  assert list(D.first_chars(["abc", "defg"], 0)) == ["abc", "defg"]


def test_files_stream_and_are_keyed_by_size_and_mtime(tok, tmp_path, monkeypatch):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
  c = make_config(tmp_path / "cache", tok, source="jsonl", path=str(path), eval_path=str(path))
  docs = S.iter_documents(c, "train")
  assert next(docs) == "one" and next(docs) == "two"  # read lazily: line 3 is not parsed yet
  with pytest.raises(ValueError, match=f"{path}:3: invalid JSON"):
    next(docs)
  path.write_text("".join(json.dumps({"text": f"Document {i}."}) + "\n" for i in range(40)))
  key, packed = S.fingerprint(c, "train"), D.prepare_split(c, tok, "train")
  with monkeypatch.context() as m:
    m.setattr(S, "_file_records", None)  # a cached split reads no document
    assert D.prepare_split(c, tok, "train") == packed
  with open(path, "a") as f:
    f.write(json.dumps({"text": "One more."}) + "\n")
  assert S.fingerprint(c, "train") != key and D.prepare_split(c, tok, "train") != packed
