"""Every file format in the streaming pipeline (train/shards.py, train/stream.py): jsonl, text,
parquet (several files, small row groups) and `datasets` save_to_disk directories (several arrow
shards) give each process its own records, which together are the cached pipeline's documents, and
the streamed rows are the cached pipeline's rows; a process decodes only its own records; a resumed
text or jsonl stream seeks to where it stopped instead of reading its files again."""
import itertools
import json

import grain
import numpy as np
import pytest

from configs.errors import UserError
from tests.test_formats import write_hf_disk, write_jsonl, write_parquet
from model import tokenizer as T
from tests.test_stream import make_config, same, take
from train import corpus, data, shards
from train import sources as S
from train import stream as ST

N = 120  # records: 3 held out (0, 50, 100)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return T.train_tokenizer(corpus.pretrain_documents(0, 300), 320, str(tmp_path_factory.mktemp("tok") / "t.model"))


def records(objective):
  """N records of random lengths: pretraining text, or SFT conversations (some longer than seq_len)."""
  rng = np.random.default_rng(3)
  words = " ".join(corpus.pretrain_documents(0, 80)).split()
  text = lambda i, k: f"{i}: " + " ".join(words[j] for j in rng.integers(0, len(words), k))
  if objective == "pretrain":
    return [{"text": text(i, rng.integers(3, 60))} for i in range(N)]
  return [{"messages": [{"role": "user", "content": f"question {i}?"},
                        {"role": "assistant", "content": text(i, rng.integers(1, 28))}]} for i in range(N)]


def write(fmt, tmp_path, recs):
  """The records in format `fmt` under tmp_path; returns data.path (a glob over several files)."""
  halves = recs[:N // 2 + 7], recs[N // 2 + 7:]
  for i, part in enumerate(halves):
    if fmt == "jsonl":
      write_jsonl(tmp_path / f"{i}.jsonl", part)
    elif fmt == "parquet":
      write_parquet(tmp_path / f"{i}.parquet", part, rows_per_group=7)
    else:
      write_hf_disk(tmp_path / f"ds{i}", part, shards=3)
  return str(tmp_path / {"jsonl": "*.jsonl", "parquet": "*.parquet", "hf_disk": "ds*"}[fmt])


def config(fmt, path, objective, cache):
  c = make_config(path)
  c.data.source, c.data.cache_dir, c.objective = fmt, cache, objective
  if objective == "sft":
    c.seq_len, c.batch_size = 64, 4
  return c


def cached_rows(cfg, tok, split="train"):
  source = grain.sources.ArrayRecordDataSource([data.prepare_split(cfg, tok, split)])
  return [np.frombuffer(source[i], "<i4").reshape(5, -1) for i in range(len(source))]


def interleave(shards_):
  return [d for d in itertools.chain(*itertools.zip_longest(*shards_)) if d is not None]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf_disk"])
@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_every_format_streams_the_cached_pipelines_documents_and_rows(tmp_path, tok, fmt, objective):
  cfg = config(fmt, write(fmt, tmp_path, records(objective)), objective, str(tmp_path / "cache"))
  for split in ("train", "eval"):
    docs = S.load_documents(cfg, split)  # what the cached pipeline packs
    assert len(docs) == (N - 3 if split == "train" else 3)
    mine = [[d for d, _ in S.shard_documents(cfg, split, p, 3)] for p in range(3)]
    assert interleave(mine) == docs, split
    assert [d for d, _ in S.shard_documents(cfg, split, 1, 3, start=4)] == mine[1][4:]
  want = cached_rows(cfg, tok)
  if objective == "pretrain":  # concatenate-and-split: the epoch's rows, the cached last one padded
    got = [r.copy() for r, _ in itertools.islice(ST.packed_rows(cfg, tok, 0, 1, ST.FIRST), len(want))]
    real = want[-1][2] > 0
    assert all(np.array_equal(a, b) for a, b in zip(got[:-1], want[:-1]))
    assert np.array_equal(got[-1][:, real], want[-1][:, real])
  else:  # one window holds every conversation: best fit over the same buffer
    got = next(ST.record_windows(cfg, tok, 0, 1, ST.FIRST))[0]
    assert [r.tolist() for r in got] == [r.tolist() for r in want]


def test_a_text_source_streams_the_paragraphs_of_its_files(tmp_path):
  paragraphs = [r["text"] for r in records("pretrain")]
  for i in range(2):  # blank lines between paragraphs (several, with spaces), CRLF line ends in one file
    part = paragraphs[i * N // 2:(i + 1) * N // 2]
    end = "\r\n" if i else "\n"
    (tmp_path / f"{i}.txt").write_bytes(("\n  \n\n".join(p.replace(" ", end, 1) for p in part) + end).encode())
  cfg = config("text", str(tmp_path / "*.txt"), "pretrain", str(tmp_path / "cache"))
  docs = S.load_documents(cfg, "train")
  assert docs == [p.replace(" ", "\n", 1) for i, p in enumerate(paragraphs) if i % 50]
  mine = [[d for d, _ in S.shard_documents(cfg, "train", p, 2)] for p in range(2)]
  assert interleave(mine) == docs
  assert [d for d, _ in S.shard_documents(cfg, "train", 0, 2, start=7)] == mine[0][7:]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf_disk"])
def test_a_process_decodes_only_its_own_records(tmp_path, fmt):
  recs = records("sft")
  bad = shards.raw_index(4, "train", True)  # the 5th train record: process 1 of 3 (4 % 3)
  recs[bad] = {"messages": [{"role": "robot", "content": "?"}]}
  cfg = config(fmt, write(fmt, tmp_path, recs), "sft", str(tmp_path / "cache"))
  assert len([d for d, _ in S.shard_documents(cfg, "train", 0, 3)]) == 39
  with pytest.raises(UserError, match=r"(row 5|\.jsonl:6): 'messages' message 0 needs a role"):
    list(S.shard_documents(cfg, "train", 1, 3))


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_a_resumed_stream_seeks_past_the_lines_it_read(tmp_path, tok, monkeypatch, fmt):
  """The lines before the saved seek are overwritten with bytes that are neither JSON nor UTF-8:
  a resume that read them again would fail; it seeks, and gives the batches of an unbroken run."""
  monkeypatch.setattr(ST, "WINDOW", 12)
  recs = records("pretrain")
  path = tmp_path / f"c.{fmt}"
  if fmt == "jsonl":
    write_jsonl(path, recs)
  else:
    path.write_text("\n\n".join(r["text"] for r in recs) + "\n")
  cfg = config(fmt, str(path), "pretrain", str(tmp_path / "cache"))
  it = ST.make_batch_iterator(cfg, tok)
  straight = take(it, 30)
  it = ST.make_batch_iterator(cfg, tok)
  take(it, 20)
  state = json.loads(json.dumps(it.get_state()))
  epoch, _, _, _, _, file, byte, line = state["processes"]["0"]
  assert epoch == 0 and file == 0 and byte > len(path.read_bytes()) // 4, state
  raw = path.read_bytes()
  path.write_bytes(bytes(b if b == 10 else 0xff for b in raw[:byte]) + raw[byte:])
  with pytest.raises(UserError, match="not UTF-8"):
    S.load_documents(cfg, "train")
  resumed = ST.make_batch_iterator(cfg, tok)
  resumed.set_state(state)
  assert same(take(resumed, 8), straight[20:28])
  assert line == raw[:byte].count(b"\n") + 1
