"""Preference pairs: masks cover completions only, rankings expand, errors name file:line,
per-process slices of the global batches, resumable order, the built-in synthetic set."""
import json

import ml_collections
import numpy as np
import pytest

from configs import sections
from model import tokenizer as T
from train import corpus, pairs
from train import reward_loss as rm

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5. <answer>5</answer>"},
            {"role": "user", "content": "And 4 + 4?"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "t.model")
  return T.train_tokenizer(corpus.pretrain_documents(0, 300), 320, path)


def make_config(cache, tok, batch_size=8, seq_len=128, **data_kw):
  c = ml_collections.ConfigDict(dict(seq_len=seq_len, batch_size=batch_size, seed=0, eval_batches=0,
                                     objective="dpo", model=dict(vocab_size=320)))
  c.data, c.tokenizer = sections.data(), sections.tokenizer()
  c.data.cache_dir, c.data.num_documents = str(cache), 300
  c.data.update(data_kw)
  c.tokenizer.path = tok.path
  return c


def records():
  return [("r0", ([{"role": "user", "content": "What is 7 * 8?"}], "7 * 8 = 56. <answer>56</answer>", "56")),
          ("r1", (MESSAGES, "4 + 4 = 8. <answer>8</answer>", "4 + 4 = 9. <answer>9</answer>"))]


def completions(b, i):
  """The chosen and rejected token ids of pair i of a batch, read back through its targets."""
  return [b["targets"][i][b["target_branch"][i] == j].tolist() for j in (1, 2)]


@pytest.mark.parametrize("template,end", [("chatml", T.IM_END), ("llama2", T.EOS)])
def test_one_row_per_pair_and_targets_are_exactly_the_completions(tok, template, end):
  msgs = [m for m in MESSAGES if m["role"] != "system"] if template == "llama2" else MESSAGES
  recs = [("r0", (msgs[-1:], "a <answer>1</answer>", "b")), ("r1", (msgs, "4 + 4 = 8.", "nine"))]
  ps = pairs.encode_records(tok, recs, 160, template)
  assert ps.truncated == 0
  batch = pairs.make_batch(ps, np.array([0, -1, 1]))   # a padding pair in the middle
  L, K = ps.columns["tokens"].shape[1], batch["targets"].shape[1]
  assert batch["tokens"].shape == (3, L) and L % 8 == 0 and K % 8 == 0 and K <= L
  assert batch["weight"].tolist() == [1, 0, 1]
  end_id = T.SPECIAL_IDS[end]
  suffix = " " if template == "llama2" else ""   # llama2 closes an assistant turn with " </s>"
  for i, (_, (m, chosen, rejected)) in zip((0, 2), recs):
    prompt, _ = T.apply_chat_template(tok, m, template, add_generation_prompt=True)
    p = len(prompt)
    tokens, branch, pos = batch["tokens"][i], batch["branch_ids"][i], batch["positions"][i]
    real = batch["segment_ids"][i] == 1
    ids = completions(batch, i)
    n_c, n_r = map(len, ids)
    assert tokens[:p].tolist() == prompt and (branch[:p] == 0).all()        # the prompt, once
    assert tokens[p:p + n_c].tolist() == ids[0] and tokens[p + n_c:p + n_c + n_r].tolist() == ids[1]
    assert branch[real].tolist() == [0] * p + [1] * n_c + [2] * n_r
    assert pos[real].tolist() == list(range(p + n_c)) + list(range(p, p + n_r))  # rejected restarts
    assert real.sum() == p + n_c + n_r and (tokens[~real] == tok.pad_id).all() and not branch[~real].any()
    for j, text in enumerate((chosen, rejected)):
      assert ids[j][-1] == end_id and tok.decode(ids[j][:-1]) == text + suffix
    # Each target is predicted from the token before it in its own sequence.
    slots = batch["logit_slots"][i][batch["target_branch"][i] > 0].tolist()
    assert slots == list(range(p - 1, p + n_c - 1)) + [p - 1] + list(range(p + n_c, p + n_c + n_r - 1))
    assert batch["ends"][i].tolist() == [p + n_c - 1, p + n_c + n_r - 1]
  assert not batch["segment_ids"][1].any() and not batch["target_branch"][1].any()  # padding pair


def test_too_long_cuts_the_prompt_from_the_left_and_both_share_it(tok):
  recs = [("r", ([{"role": "user", "content": "word " * 60}], "short answer", "a much much longer answer"))]
  ps = pairs.encode_records(tok, recs, 40, "chatml", overlong="truncate")
  assert ps.truncated == 1
  b = pairs.make_batch(ps, np.array([0]))
  p = int(ps.columns["prompt_lengths"][0])
  ids = completions(b, 0)
  for j, text in enumerate(("short answer", "a much much longer answer")):
    assert tok.decode(ids[j][:-1]) == text
  # The rejected prompt is cut more; the chosen completion shares it (a suffix of its own prompt).
  assert p + max(map(len, ids)) == 40 and p + min(map(len, ids)) < 40
  full, n = pairs.encode(tok, recs[0][1][0], "short answer", "chatml")
  assert b["tokens"][0, :p].tolist() == full[n - p:n]


def test_rankings_give_all_pairs_and_errors_name_file_and_line(tmp_path):
  assert rm.ranking_to_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
  f = tmp_path / "prefs.jsonl"
  lines = [{"prompt": "p", "chosen": "c", "rejected": "r"},
           {"messages": [{"role": "user", "content": "q"}], "responses": ["a", "b", "c", "d"]}]
  f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  got = list(pairs.read(str(f)))
  assert [w for w, _ in got] == [f"{f}:1", f"{f}:2"]
  assert [(c, r) for _, ps in got for _, c, r in ps] == [
      ("c", "r"), ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
  bad = [("{not json", "invalid JSON"), ('{"prompt": "p", "chosen": "c"}', "rejected"),
         ('{"prompt": "p", "responses": ["only one"]}', "at least 2"),
         ('{"prompt": "p", "messages": [], "chosen": "c", "rejected": "r"}', "exactly one"),
         ('{"messages": [{"role": "assistant", "content": "x"}], "chosen": "c", "rejected": "r"}', "assistant"),
         ('{"prompt": 3, "chosen": "c", "rejected": "r"}', "'prompt' must be a string")]
  for text, why in bad:
    f.write_text(json.dumps(lines[0]) + "\n\n" + text + "\n")
    with pytest.raises(ValueError, match=rf"{f}:3: .*{why}"):
      list(pairs.read(str(f)))


def test_jsonl_source_holds_out_every_50th_record(tmp_path, tok):
  f = tmp_path / "p.jsonl"
  f.write_text("".join(json.dumps({"prompt": f"q{i}", "responses": ["a", "b", "c"]}) + "\n" for i in range(120)))
  c = make_config(tmp_path / "cache", tok, source="jsonl", path=str(f))
  train, held = pairs.load(c, tok, "train"), pairs.load(c, tok, "eval")
  assert len(held) == 3 * 3 and len(train) == 117 * 3   # records 0, 50, 100 with all 3 pairs each
  again = pairs.load(c, tok, "train")                     # from the cache
  np.testing.assert_array_equal(again.columns["tokens"], train.columns["tokens"])


def test_process_slices_resume_and_epochs(tmp_path, tok):
  c = make_config(tmp_path, tok, batch_size=8, num_documents=60, overlong="truncate")
  ps = pairs.load(c, tok, "train")
  one = pairs.make_batches(c, tok, "train")
  parts = [pairs.make_batches(c, tok, "train", p, 2) for p in range(2)]
  seen = []
  for s in range(15):   # 120 pairs = two epochs of 60
    whole = next(one)
    halves = [next(it) for it in parts]
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])
    seen.append(whole["tokens"])
  rows = {ps.columns["tokens"][i].tobytes(): i for i in range(len(ps))}   # tokens [b, L]
  order = [rows[t.tobytes()] for b in seen for t in b]
  assert sorted(order[:60]) == sorted(order[60:]) == list(range(60)) and order[:60] != order[60:]
  resumed = pairs.make_batches(c, tok, "train")
  resumed.set_state({"step": 9})
  np.testing.assert_array_equal(next(resumed)["tokens"], seen[9])
  assert one.get_state() == {"step": 15}


def test_eval_batches_cover_every_pair_once(tmp_path, tok):
  c = make_config(tmp_path, tok, batch_size=8, num_documents=1000, overlong="truncate")  # 20 held-out pairs
  batches = pairs.make_batches(c, tok, "eval")
  assert len(batches) == 3 and sum(b["weight"].sum() for b in batches) == 20
  assert batches[-1]["weight"].tolist() == [1] * 4 + [0] * 4
  halves = [pairs.make_batches(c, tok, "eval", p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([halves[0][1]["tokens"], halves[1][1]["tokens"]]),
                                batches[1]["tokens"])


def test_builtin_pairs(tmp_path, tok):
  problems = corpus.train_problems(0, 400)
  recs = pairs.builtin_records(problems)
  kinds = {"wrong": 0, "untagged": 0}
  for p, (msgs, chosen, rejected) in zip(problems, recs):
    assert msgs == [{"role": "user", "content": p.question}] and chosen == corpus.format_completion(p)
    if "<answer>" in rejected:   # the same format, a wrong final number
      kinds["wrong"] += 1
      wrong = rejected.split("<answer>")[1].split("</answer>")[0]
      assert wrong != p.answer and rejected.endswith(f"= {wrong}. <answer>{wrong}</answer>")
    else:
      kinds["untagged"] += 1
      assert rejected == f"{p.solution} {p.answer}"
  assert min(kinds.values()) > 150
  c = make_config(tmp_path, tok, num_documents=1000)
  held = pairs.records(c, "eval")[0]
  assert len(held) == 20 and all(corpus.is_heldout(corpus.Problem(m[0]["content"], "", ""))
                                 for _, (m, _, _) in held)
