"""Bad data is named or counted, never silently used: a byte that is not UTF-8 names file:line;
preference pairs with chosen == rejected are skipped and counted; SFT conversations, pairs and RL
prompts longer than their limit are dropped or cut (config.data.overlong) and counted in the start
line and one warning line; nothing left is an error; sampling warns past the trained context."""
import json

import grain
import ml_collections
import numpy as np
import pytest

from configs import sections, tools
from configs.errors import UserError
from eval import sample
from model import tokenizer as T
from rl import prompts
from train import corpus, pairs
from train import data as D
from train import packing as P
from train import sources as S

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "t.model")
  return T.train_tokenizer(corpus.pretrain_documents(0, 300), 320, path)


def make_config(tmp_path, tok, objective, path, **data):
  """A config reading `path` (JSONL) for training; `path` again as the eval file (no hold-out)."""
  c = ml_collections.ConfigDict(dict(seq_len=SEQ_LEN, batch_size=2, seed=0, eval_batches=0,
                                     objective=objective, model=dict(vocab_size=320)))
  c.data, c.tokenizer = sections.data(), sections.tokenizer()
  c.data.update({"cache_dir": str(tmp_path / "cache"), "source": "jsonl", "path": str(path),
                 "eval_path": str(path), **data})
  c.tokenizer.path = tok.path
  return c


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


# ----------------------------------------------------------------------------- UTF-8


def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path, tok):
  path = tmp_path / "d.jsonl"
  lines = [b'{"text": "fine"}\n', b'{"text": "caf\xc3\xa9"}\n', b'{"text": "caf\xe9 latin-1"}\n']
  path.write_bytes(b"".join(lines))
  where = f"{path}:3: not UTF-8 \\(byte 0xe9 at column 14, byte offset {len(lines[0]) + len(lines[1]) + 13} "
  with pytest.raises(UserError, match=where) as e:
    S.load_documents(make_config(tmp_path, tok, "pretrain", path), "train")
  assert "iconv" in e.value.hint
  for read in (pairs.read, prompts.read):  # every JSONL reader: the same error
    with pytest.raises(UserError, match=where):
      list(read(str(path)))
  text = tmp_path / "d.txt"
  text.write_bytes(b"para one\n\npara two\n\xff\n")
  c = make_config(tmp_path, tok, "pretrain", text, source="text")
  with pytest.raises(UserError, match=f"{text}:4: not UTF-8 \\(byte 0xff at column 1"):
    S.load_documents(c, "train")


# ----------------------------------------------------------------------------- preference pairs


def test_pairs_with_chosen_equal_to_rejected_are_skipped_and_counted(tmp_path, tok):
  recs = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(5)]
  recs[1]["rejected"] = recs[1]["chosen"]
  recs[3] = {"prompt": "Rank", "responses": ["same", "same", "other"]}      # one of its 3 pairs is degenerate
  recs.append({"prompt": "word " * 40, "chosen": "a", "rejected": "b"})     # longer than seq_len
  path = write_jsonl(tmp_path / "p.jsonl", recs)
  c = make_config(tmp_path, tok, "dpo", path)
  it = pairs.make_batches(c, tok, "train")
  assert it.ps.counts.total == 8 and len(it.ps) == 5          # 4 + 3 + 1 pairs read, 5 left
  assert it.describe() == ("5 train pairs (1 longer than config.seq_len=32 dropped, "
                           "2 with chosen == rejected skipped)")
  assert it.warning() == ("warning: of 8 train pairs, 1 longer than config.seq_len=32 were dropped; "
                          "2 with chosen == rejected were skipped (config.data.overlong=truncate keeps "
                          "them, cut to fit)")
  # What is trained on: one epoch of batches holds exactly the other pairs, each once.
  want = sorted([(r["chosen"], r["rejected"]) for i, r in enumerate(recs[:5]) if i not in (1, 3)]
                + [("same", "other"), ("same", "other")])
  got = []
  for _ in range(3):  # 3 batches of 2 = 6 > 5: the first 5 of the stream are epoch 0
    b = next(it)
    got += [tuple(tok.decode(ids[:-1]) for ids in completions(b, i)) for i in range(2)]
  assert sorted(got[:5]) == want
  # Cut to fit instead: the long pair stays, counted; the cache does not reuse the "drop" rows.
  cut = pairs.make_batches(make_config(tmp_path, tok, "dpo", path, overlong="truncate"), tok, "train")
  assert len(cut.ps) == 6 and cut.ps.truncated == 1 and cut.ps.key != it.ps.key
  assert "1 were cut to config.seq_len=32" in cut.warning() and "overlong=drop" in cut.warning()
  # Nothing left: an error naming the file and the key.
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
  with pytest.raises(UserError, match=f"data.path='{bad}': all 1 train pairs have chosen == rejected"):
    pairs.load(make_config(tmp_path, tok, "dpo", bad), tok, "train")
  with pytest.raises(UserError, match="are longer than config.seq_len=32") as e:
    pairs.load(make_config(tmp_path, tok, "dpo", write_jsonl(tmp_path / "long.jsonl", recs[5:])), tok, "train")
  assert "config.data.overlong=truncate" in e.value.hint


def completions(b, i):
  """The chosen and rejected token ids of pair i of a batch."""
  return [b["targets"][i][b["target_branch"][i] == j].tolist() for j in (1, 2)]


# ----------------------------------------------------------------------------- SFT


def chatml_by_hand(tok, user: str, assistant: str):
  """(ids, loss mask) of a user / assistant ChatML conversation, piece by piece."""
  pieces = [(tok.encode(f"{T.IM_START}user\n"), 0), (tok.encode(user) + [tok.im_end_id], 0),
            (tok.encode("\n"), 0), (tok.encode(f"{T.IM_START}assistant\n"), 0),
            (tok.encode(assistant) + [tok.im_end_id], 1), (tok.encode("\n"), 0)]
  return [i for p, _ in pieces for i in p], [m for p, m in pieces for _ in p]


def rows_of(path):
  src = grain.sources.ArrayRecordDataSource([path])
  return [P.parse_row(src[i]) for i in range(len(src))]


def segments(rows):
  """Every segment of the rows: [3, k] inputs, targets, loss_mask."""
  return [np.stack([r["inputs"][r["segment_ids"] == s], r["targets"][r["segment_ids"] == s],
                    r["loss_mask"][r["segment_ids"] == s]]).astype(np.int64)
          for r in rows for s in range(1, r["segment_ids"].max() + 1)]


def test_sft_conversations_longer_than_seq_len_are_dropped_or_cut(tmp_path, tok):
  talks = [("What is 2 + 2?", "4"),
           ("Add 17 and 25.", "17 + 25 = 42, so the answer is " * 4 + "42"),   # long answer
           ("Tell me " + "a lot about numbers " * 8, "ok")]                     # no answer token fits
  path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": u, "completion": a} for u, a in talks])
  by_hand = [chatml_by_hand(tok, u, a) for u, a in talks]
  assert [len(ids) - 1 > SEQ_LEN for ids, _ in by_hand] == [False, True, True]
  assert not any(by_hand[2][1][1:SEQ_LEN + 1])
  want = [np.array([ids[:-1], ids[1:], mask[1:]])[:, :SEQ_LEN] for ids, mask in by_hand]

  drop = make_config(tmp_path, tok, "sft", path)
  it = D.make_batch_iterator(drop, tok)
  assert [s.tolist() for s in segments(rows_of(D.prepare_split(drop, tok, "train")))] == [want[0].tolist()]
  assert it.describe() == "1 train conversations (2 longer than config.seq_len=32 dropped)"
  assert it.warning() == ("warning: of 3 train conversations, 2 longer than config.seq_len=32 were dropped "
                          "(config.data.overlong=truncate keeps them, cut to fit)")

  cut = make_config(tmp_path, tok, "sft", path, overlong="truncate")
  got = sorted((s.tolist() for s in segments(rows_of(D.prepare_split(cut, tok, "train")))), key=len)
  # The long answer keeps its first 32 positions, its loss mask on the answer tokens that fit.
  assert got == sorted([want[0].tolist(), want[1].tolist()], key=len)
  assert want[1][2].sum() > 0 and want[1].shape[1] == SEQ_LEN
  it = D.make_batch_iterator(cut, tok)
  assert it.describe() == ("2 train conversations (1 longer than config.seq_len=32 dropped, "
                           "1 cut to config.seq_len=32)")
  assert "config.data.overlong=drop skips them" in it.warning()

  long_only = write_jsonl(tmp_path / "long.jsonl", [{"prompt": u, "completion": a} for u, a in talks[1:]])
  with pytest.raises(UserError, match=f"data.path='{long_only}': all 2 train conversations are longer "
                                      "than config.seq_len=32") as e:
    D.prepare_split(make_config(tmp_path, tok, "sft", long_only), tok, "train")
  assert "raise config.seq_len" in e.value.hint
  with pytest.raises(UserError, match="config.data.overlong='cut'"):
    D.prepare_split(make_config(tmp_path, tok, "sft", path, overlong="cut"), tok, "train")


# ----------------------------------------------------------------------------- RL prompts, sampling


def test_rl_prompts_longer_than_max_prompt_len_are_counted(tmp_path, tok):
  path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2 + 2?", "answer": 4},
                                            {"prompt": "word " * 60, "answer": 1}])
  recs = prompts.read(str(path))
  kept, counts = prompts.fit(recs, tok, "chatml", 48, "drop", str(path))
  assert kept == recs[:1] and counts.dropped == 1
  assert counts.warning().startswith("warning: of 2 jsonl prompts, 1 longer than config.rl.max_prompt_len=48")
  kept, counts = prompts.fit(recs, tok, "chatml", 48, "truncate", str(path))
  assert kept == recs and counts.truncated == 1
  with pytest.raises(UserError, match=f"{path}: all 1 jsonl prompts are longer"):
    prompts.fit(recs[1:], tok, "chatml", 48, "drop", str(path))


def test_sampling_warns_past_the_trained_context(tok):
  long = "What is 2 + 2? " * 700  # 10,500 characters
  a = tools.sample()
  lines = sample.context_warnings(tok, ["What is 2 + 2?", long], True, "chatml", a.max_new_tokens, 128)
  n = len(sample.prompt_ids(tok, long, True, "chatml"))
  assert n > 128 and lines == [
      f"warning: prompt 2 is {n:,} tokens; with config.max_new_tokens=64 it reaches {n + 64:,} positions, "
      f"past the config.seq_len=128 the run was trained on ({(n + 64) / 128:.1f}x): shorten it or expect "
      "degraded text"]
  assert sample.context_warnings(tok, ["What is 2 + 2?"], False, "chatml", 64, 128) == []
  assert len(sample.context_warnings(tok, ["What is 2 + 2?"], False, "chatml", 200, 128)) == 1



# ----------------------------------------------------------------------------- end to end (slow)


def tiny_run_config(module, tmp_path, tok, path, **overrides):
  c = module.get_config()
  c.data.update({"cache_dir": str(tmp_path / "cache"), "source": "jsonl", "path": str(path),
                 "eval_path": str(path)})
  c.tokenizer.path = tok.path
  c.seq_len, c.batch_size, c.steps = 64, 8, 2
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 1, 0, 2, 0
  c.async_checkpoints = False
  c.update_from_flattened_dict(overrides)  # 'a.b' keys
  return c


@pytest.mark.slow
def test_runs_report_their_counts_and_sampling_warns(tmp_path, tok, capsys):
  from configs import reward_tiny, sft_tiny
  from train import loop
  talks = [{"prompt": f"What is {i} + {i}?", "completion": f"{2 * i}"} for i in range(20)]
  talks += [{"prompt": "Say it.", "completion": "words " * 80}] * 3
  sft = tiny_run_config(sft_tiny, tmp_path, tok, write_jsonl(tmp_path / "sft.jsonl", talks))
  loop.train(sft, str(tmp_path / "sft"))
  out = capsys.readouterr().out
  assert "| 20 train conversations (3 longer than config.seq_len=64 dropped)" in out
  assert ("warning: of 23 train conversations, 3 longer than config.seq_len=64 were dropped "
          "(config.data.overlong=truncate keeps them, cut to fit)") in out

  a = tools.sample()
  a.prompts, a.max_new_tokens = ("What is 2 + 2? " * 8,), 4
  sample.print_samples(str(tmp_path / "sft"), a)
  err = capsys.readouterr().err
  assert "warning: prompt 1 is" in err and "past the config.seq_len=64 the run was trained on" in err

  prefs = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(20)]
  prefs += [{"prompt": "Same?", "chosen": "yes", "rejected": "yes"}] * 2
  rm = tiny_run_config(reward_tiny, tmp_path, tok, write_jsonl(tmp_path / "p.jsonl", prefs), init_from="")
  loop.train(rm, str(tmp_path / "rm"))
  out = capsys.readouterr().out
  assert "| 20 train pairs (2 with chosen == rejected skipped)" in out
  assert "warning: of 22 train pairs, 2 with chosen == rejected were skipped" in out
