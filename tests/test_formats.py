"""The formats researchers already have: TRL's conversational preference pairs (explicit and implicit
prompt) parse to the pairs of the equivalent Kiln records; parquet files and `datasets` save_to_disk
directories read back the records of a JSONL file, in order, with file:row locations, for SFT, pairs
and RL prompts; a malformed row names its file and row. Slow: DPO from a tiny SFT run on a TRL-format
JSONL and on a parquet file of the same pairs trains identically."""
import json
import math
import os

import datasets
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import dpo_tiny, sections, sft_tiny
from configs.errors import UserError
from model import tokenizer as T
from rl import prompts
from train import corpus, formats, loop, pairs, sources

SYS = {"role": "system", "content": "Answer with a number."}


def user(text):
  return {"role": "user", "content": text}


def assistant(text):
  return {"role": "assistant", "content": text}


def write_jsonl(path, recs):
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  return str(path)


def write_parquet(path, recs, rows_per_group=2):
  pq.write_table(pa.Table.from_pylist(recs), str(path), row_group_size=rows_per_group)
  return str(path)


def write_hf_disk(path, recs, shards=2):
  datasets.disable_progress_bars()
  datasets.Dataset.from_list(recs).save_to_disk(str(path), num_shards=shards)
  return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "t.model")
  return T.train_tokenizer(corpus.pretrain_documents(0, 300), 320, path)


# ----------------------------------------------------------------------------- TRL preference pairs

# (TRL conversational record, the Kiln record it means, the (prompt, chosen, rejected) both parse to)
TRL_CASES = [
    ({"prompt": [user("2 + 3?")], "chosen": [assistant("5")], "rejected": [assistant("6")]},
     {"prompt": "2 + 3?", "chosen": "5", "rejected": "6"},
     ([user("2 + 3?")], "5", "6")),
    ({"prompt": [SYS, user("7 * 8?")], "chosen": [assistant("56")], "rejected": [assistant("54")]},
     {"messages": [SYS, user("7 * 8?")], "chosen": "56", "rejected": "54"},
     ([SYS, user("7 * 8?")], "56", "54")),
    ({"chosen": [SYS, user("9 - 4?"), assistant("5")], "rejected": [SYS, user("9 - 4?"), assistant("13")]},
     {"messages": [SYS, user("9 - 4?")], "chosen": "5", "rejected": "13"},
     ([SYS, user("9 - 4?")], "5", "13")),
    ({"chosen": [user("1 + 1?"), assistant("2"), user("and 2 + 2?"), assistant("4")],
      "rejected": [user("1 + 1?"), assistant("2"), user("and 2 + 2?"), assistant("5")]},
     {"messages": [user("1 + 1?"), assistant("2"), user("and 2 + 2?")], "chosen": "4", "rejected": "5"},
     ([user("1 + 1?"), assistant("2"), user("and 2 + 2?")], "4", "5")),
]


def test_trl_conversational_pairs_parse_as_the_equivalent_kiln_records(tmp_path, tok):
  trl = write_jsonl(tmp_path / "trl.jsonl", [t for t, _, _ in TRL_CASES])
  kiln = write_jsonl(tmp_path / "kiln.jsonl", [k for _, k, _ in TRL_CASES])
  expected = [[want] for _, _, want in TRL_CASES]
  got_trl, got_kiln = list(pairs.read(trl)), list(pairs.read(kiln))
  assert [ps for _, ps in got_trl] == [ps for _, ps in got_kiln] == expected
  assert [w for w, _ in got_trl] == [f"{trl}:{i}" for i in range(1, 5)]
  a, b = (pairs.encode_records(tok, [(w, p) for w, ps in got for p in ps], 128, "chatml")
          for got in (got_trl, got_kiln))
  for k in a.columns:
    np.testing.assert_array_equal(a.columns[k], b.columns[k])


def test_a_completion_of_several_turns_is_every_token_after_the_prompt(tok):
  prompt = [user("Count to two, one reply per number.")]
  chosen = [assistant("1"), user("go on"), assistant("2")]
  rejected = [assistant("1"), user("go on"), assistant("3")]
  (got,) = pairs.parse_record({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "r")
  assert got == (prompt, chosen, rejected)
  implicit = pairs.parse_record({"chosen": prompt + chosen, "rejected": prompt + rejected}, "r")
  assert implicit == [(prompt + chosen[:2], "2", "3")]   # the shared turns are the prompt
  ps = pairs.encode_records(tok, [("r", got)], 128, "chatml")
  head, _ = T.apply_chat_template(tok, prompt, "chatml", add_generation_prompt=True)
  n_c, n_r = ps.columns["lengths"][0]
  row = ps.columns["tokens"][0].tolist()
  newline = tok.encode("\n")   # ChatML's text after a turn's <|im_end|>: not part of the completion
  assert row[:len(head)] == head
  for start, n, completion in ((len(head), n_c, chosen), (len(head) + n_c, n_r, rejected)):
    full, _ = T.apply_chat_template(tok, prompt + completion, "chatml")
    assert full[-len(newline):] == newline and row[start:start + n] == full[len(head):-len(newline)]
    assert row[start + n - 1] == tok.im_end_id


U, A = [user("a")], [assistant("x")]
BAD_PAIRS = [
    ({"chosen": U + A, "rejected": [user("b"), assistant("y")]}, "share no first message"),
    ({"chosen": U + A + [user("c")] + A, "rejected": U + A + [user("d")] + A}, "first differ at message 2"),
    ({"prompt": U, "chosen": A + [user("y")], "rejected": "z"}, "'chosen' must start and end"),
    ({"prompt": U, "chosen": [user("x")], "rejected": A}, "'chosen' must start"),
    ({"prompt": U + A, "chosen": "x", "rejected": "y"}, "'prompt' is the prompt: it must not end"),
    ({"prompt": U, "chosen": [{"role": "bot", "content": "x"}], "rejected": "y"}, "'chosen' message 0 needs a role"),
    ({"prompt": U, "chosen": 3, "rejected": "y"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "x", "rejected": "y"}, "needs exactly one of 'prompt'"),
]


@pytest.mark.parametrize("rec,why", BAD_PAIRS, ids=[w for _, w in BAD_PAIRS])
def test_a_malformed_trl_pair_names_file_and_line(tmp_path, rec, why):
  path = write_jsonl(tmp_path / "p.jsonl", [TRL_CASES[0][0], rec])
  with pytest.raises(UserError, match=f"{path}:2: .*{why}"):
    list(pairs.read(path))


# ----------------------------------------------------------------------------- parquet and hf_disk

# SFT conversations, a pair, RL prompts: the first record has every column (datasets and pyarrow
# take the columns from it); a missing key reads back as missing (a null), as in JSONL.
RECORDS = [{"messages": [SYS, user("2 + 2?"), assistant("4")], "prompt": None, "completion": None, "answer": "4"},
           {"messages": [user("hi"), assistant("hello")]},
           {"prompt": "3 + 3?", "completion": "6", "answer": "6"},
           {"messages": [user("q"), assistant("a"), user("q2"), assistant("a2")], "answer": "a2"},
           {"prompt": "5 - 1?", "completion": "4"}]


def expected(recs):
  return [{k: v for k, v in r.items() if v is not None} for r in recs]


def test_parquet_and_hf_disk_read_back_the_records_in_order_with_file_row(tmp_path, monkeypatch):
  monkeypatch.setattr(formats, "BATCH_ROWS", 2)   # several row batches, across row groups / shards
  pq_path = write_parquet(tmp_path / "d.parquet", RECORDS)
  hf_path = write_hf_disk(tmp_path / "hf", RECORDS, shards=2)
  assert pq.ParquetFile(pq_path).metadata.num_row_groups == 3
  assert len([f for f in os.listdir(hf_path) if f.endswith(".arrow")]) == 2
  for fmt, path in (("parquet", pq_path), ("hf_disk", hf_path)):
    got = list(formats.records(fmt, path))
    assert [r for _, r in got] == expected(RECORDS)
    assert [w for w, _ in got] == [f"{path}:row {i}" for i in range(len(RECORDS))]
    assert formats.detect(path) == fmt
  # a glob over several parquet files reads them in sorted order
  write_parquet(tmp_path / "e.parquet", RECORDS[:2])
  got = list(formats.records("parquet", str(tmp_path / "*.parquet")))
  assert [w for w, _ in got][-2:] == [f"{tmp_path / 'e.parquet'}:row {i}" for i in range(2)]


def data_config(tmp_path, objective, source, path, tok=None):
  c = ml_collections.ConfigDict(dict(seq_len=128, batch_size=2, seed=0, eval_batches=0, objective=objective,
                                     model=dict(vocab_size=320)))
  c.data, c.tokenizer = sections.data(), sections.tokenizer()
  c.data.update(cache_dir=str(tmp_path / "cache"), source=source, path=path, eval_path=path)
  c.tokenizer.path = tok.path if tok else ""
  return c


def test_sft_pairs_and_rl_prompts_from_every_format(tmp_path, tok):
  paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", expected(RECORDS)),
           "parquet": write_parquet(tmp_path / "d.parquet", RECORDS),
           "hf_disk": write_hf_disk(tmp_path / "hf", RECORDS)}
  docs = {f: sources.load_documents(data_config(tmp_path, "sft", f, p), "eval") for f, p in paths.items()}
  assert docs["jsonl"][2] == [user("3 + 3?"), assistant("6")]
  assert docs["parquet"] == docs["hf_disk"] == docs["jsonl"] and len(docs["jsonl"]) == 5
  pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [SYS, user("2 + 2?")], "completion": [assistant("4")]}])
  assert sources.load_documents(data_config(tmp_path, "sft", "jsonl", pc), "eval") == [RECORDS[0]["messages"]]

  ask = [{"prompt": [SYS, user(f"{i} + 1?")], "answer": i + 1} for i in range(3)]   # TRL's conversational prompt
  got = {f: prompts.read(p, True, f) for f, p in (("jsonl", write_jsonl(tmp_path / "p.jsonl", ask)),
                                                  ("parquet", write_parquet(tmp_path / "p.parquet", ask)),
                                                  ("hf_disk", write_hf_disk(tmp_path / "phf", ask)))}
  assert got["jsonl"][0] == prompts.Prompt((SYS, user("0 + 1?")), "1")
  assert got["parquet"] == got["hf_disk"] == got["jsonl"]

  trl = [t for t, _, _ in TRL_CASES[:2]]   # explicit prompts: one schema for pyarrow and datasets
  cols = {}
  for f, p in (("jsonl", write_jsonl(tmp_path / "t.jsonl", trl)),
               ("parquet", write_parquet(tmp_path / "t.parquet", trl)),
               ("hf_disk", write_hf_disk(tmp_path / "thf", trl, shards=1))):
    cols[f] = pairs.load(data_config(tmp_path, "dpo", f, p, tok), tok, "eval").columns
  for k in cols["jsonl"]:
    np.testing.assert_array_equal(cols["parquet"][k], cols["jsonl"][k])
    np.testing.assert_array_equal(cols["hf_disk"][k], cols["jsonl"][k])


def test_malformed_rows_and_directories_name_file_and_row(tmp_path):
  recs = [{"prompt": "ok", "chosen": "a", "rejected": "b"}, {"prompt": "ok", "chosen": "a", "rejected": None}]
  for fmt, path in (("parquet", write_parquet(tmp_path / "bad.parquet", recs)),
                    ("hf_disk", write_hf_disk(tmp_path / "bad", recs, shards=1))):
    with pytest.raises(UserError, match=f"{path}:row 1: needs 'chosen' and 'rejected'"):
      list(pairs.read(path, fmt))
  convo = [{"messages": [user("q"), {"role": "robot", "content": "a"}]}]
  c = data_config(tmp_path, "sft", "parquet", write_parquet(tmp_path / "c.parquet", convo))
  with pytest.raises(UserError, match=r"c\.parquet:row 0: 'messages' message 1 needs a role"):
    sources.load_documents(c, "train")
  datasets.DatasetDict(train=datasets.Dataset.from_list(recs)).save_to_disk(str(tmp_path / "dd"))
  with pytest.raises(UserError, match="is a DatasetDict: name one split's directory") as e:
    list(formats.records("hf_disk", str(tmp_path / "dd")))
  assert e.value.hint == str(tmp_path / "dd" / "train")
  (tmp_path / "junk.parquet").write_text("not parquet")
  with pytest.raises(UserError, match="junk.parquet: not a parquet file"):
    list(formats.records("parquet", str(tmp_path / "junk.parquet")))
  with pytest.raises(UserError, match=r"config\.data\.path='nothing\*' matches no file"):
    list(formats.records("parquet", "nothing*"))


def test_a_resaved_hf_disk_directory_changes_the_cache_identity(tmp_path):
  c = data_config(tmp_path, "sft", "hf_disk", write_hf_disk(tmp_path / "hf", RECORDS, shards=1))
  before = sources.fingerprint(c, "train")
  write_hf_disk(tmp_path / "hf_new", RECORDS[:3], shards=1)
  os.replace(tmp_path / "hf_new" / "data-00000-of-00001.arrow", tmp_path / "hf" / "data-00000-of-00001.arrow")
  assert sources.fingerprint(c, "train") != before


# ----------------------------------------------------------------------------- DPO end to end


@pytest.mark.slow
def test_dpo_on_a_trl_jsonl_and_on_a_parquet_file_of_the_same_pairs(tmp_path, data_cache):
  sft = sft_tiny.get_config()
  sft.data.cache_dir, sft.data.num_documents = data_cache, 400
  sft.update_from_flattened_dict(dict(steps=2, batch_size=8, seq_len=128, log_every=1, eval_every=0,
                                      checkpoint_every=1000, async_checkpoints=False))
  loop.train(sft, str(tmp_path / "sft"))
  problems = corpus.train_problems(1, 64)
  kiln, trl = [], []
  for i, (msgs, chosen, rejected) in enumerate(pairs.builtin_records(problems)):
    kiln.append({"prompt": msgs[0]["content"], "chosen": chosen, "rejected": rejected})
    trl.append({"prompt": msgs, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]} if i % 2 else
               {"chosen": msgs + [assistant(chosen)], "rejected": msgs + [assistant(rejected)]})
  runs = {}
  for fmt, path in (("jsonl", write_jsonl(tmp_path / "trl.jsonl", trl)),
                    ("parquet", write_parquet(tmp_path / "kiln.parquet", kiln, rows_per_group=16))):
    c = dpo_tiny.get_config()
    c.update_from_flattened_dict({
        "init_from": str(tmp_path / "sft"), "data.cache_dir": data_cache, "data.source": fmt,
        "data.path": path, "steps": 2, "batch_size": 8, "seq_len": 128, "log_every": 1, "eval_every": 2,
        "eval_batches": 0, "checkpoint_every": 1000, "async_checkpoints": False, "optim.lr": 1e-3,
        "optim.warmup_steps": 0})
    out = loop.train(c, str(tmp_path / fmt))
    with open(tmp_path / fmt / "metrics.jsonl") as f:
      rows = [json.loads(line) for line in f]
    runs[fmt] = [r["train/loss"] for r in rows if "train/loss" in r] + [out["eval/loss"]]
  assert len(runs["jsonl"]) == 3 and abs(runs["jsonl"][0] - math.log(2)) < 1e-5   # policy == reference
  np.testing.assert_allclose(runs["parquet"], runs["jsonl"], rtol=1e-6)
