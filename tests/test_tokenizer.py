"""Tokenizer: training, round trips, special tokens, chat templates."""
import os

import pytest

from model import hf_tokenizer
from model import tokenizer as T
from train import corpus

VOCAB = 320


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "t.model")
  return T.train_tokenizer(corpus.pretrain_documents(0, 300), VOCAB, path)


def test_ids_and_size(tok):
  assert tok.vocab_size == VOCAB
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 2, 3, 4, 5)
  assert tok.id_to_piece(4) == "<|im_start|>"


@pytest.mark.parametrize("text", [
    "Héllo  wörld, 123 + 4567 = 4690.\n\n  indented\ttab 日本語 🙂 ",
    "", " ", "What is 17 + 25?", "a\r\nb  \n"])
def test_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_bos_eos_and_pad_are_not_text(tok):
  ids = tok.encode("hi", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode(ids + [tok.pad_id] * 3 + [VOCAB + 7]) == "hi"


def test_chat_tokens_are_single_ids_even_inside_text(tok):
  ids = tok.encode("abc<|im_start|>xyz<|im_end|>q")
  assert ids.count(tok.im_start_id) == 1 and ids.count(tok.im_end_id) == 1
  assert tok.encode("<|im_end|>") == [tok.im_end_id]


def test_load_gives_identical_ids(tok):
  again = hf_tokenizer.load_tokenizer(tok.path)
  text = corpus.pretrain_documents(1, 20)[3]
  assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size


def test_training_is_deterministic(tok, tmp_path):
  other = T.train_tokenizer(corpus.pretrain_documents(0, 300), VOCAB, str(tmp_path / "b.model"))
  assert other.model_proto == tok.model_proto
  assert [p for p in os.listdir(tmp_path)] == ["b.model"]  # no temp files left


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    hf_tokenizer.load_tokenizer(str(tmp_path / "nope.model"))
  with pytest.raises(ValueError, match="vocab_size=256"):
    T.train_tokenizer(["some text"], 256, str(tmp_path / "a.model"))
  with pytest.raises(ValueError, match="vocab_size=4000"):
    T.train_tokenizer(["a tiny corpus"] * 5, 4000, str(tmp_path / "a.model"))


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4. <answer>4</answer>"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"}]


def _masked(tok, ids, mask):
  return [i for i, m in zip(ids, mask) if m]


def test_chatml(tok):
  ids, mask = T.apply_chat_template(tok, CHAT, "chatml")
  assert len(ids) == len(mask)
  assert tok.decode(ids) == "".join(
      f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)
  want = tok.encode("2 + 2 = 4. <answer>4</answer>") + [tok.im_end_id] + tok.encode("6") + [tok.im_end_id]
  assert _masked(tok, ids, mask) == want
  prompt, pmask = T.apply_chat_template(tok, CHAT[:2], "chatml", add_generation_prompt=True)
  assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and not any(pmask)
  assert ids[:len(prompt)] == prompt  # the prompt is a prefix of the full conversation
  assert T.stop_id(tok, "chatml") == tok.im_end_id


def test_llama2(tok):
  ids, mask = T.apply_chat_template(tok, CHAT, "llama2")
  assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 2
  assert tok.decode(ids) == ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 2? [/INST] "
                             "2 + 2 = 4. <answer>4</answer> [INST] And 3 + 3? [/INST] 6 ")
  masked = _masked(tok, ids, mask)
  assert masked.count(tok.eos_id) == 2 and masked[-1] == tok.eos_id
  assert tok.decode(masked) == "2 + 2 = 4. <answer>4</answer> 6 "
  assert T.stop_id(tok, "llama2") == tok.eos_id


def test_bad_role_and_template(tok):
  with pytest.raises(ValueError, match="'robot'"):
    T.apply_chat_template(tok, [{"role": "robot", "content": "x"}])
  with pytest.raises(ValueError, match="'zephyr'"):
    T.apply_chat_template(tok, CHAT, "zephyr")
