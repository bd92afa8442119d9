"""data.chat_template=hf: the tokenizer's own jinja template (model/chat_template.py) against
transformers' apply_chat_template, on local tokenizers with the published Llama 3, Qwen2 and
Mistral templates; the assistant mask against spans built by hand; an SFT run on it (slow)."""
import json
import os
import pickle
import random

import pytest

transformers = pytest.importorskip("transformers")

from configs.errors import UserError  # noqa: E402
from model import hf_tokenizer  # noqa: E402
from model import tokenizer as T  # noqa: E402

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
        {{- raise_exception("After the optional system message, roles must alternate user/assistant/...") }}
    {%- endif %}
    {%- set ns.index = ns.index + 1 %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] " + tools | tojson + "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, besides an initial system message!") }}
    {%- endif %}
{%- endfor %}
"""

# name: (template, special tokens, bos, eos, byte-level (else metaspace), the assistant span of a content)
FAMILIES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", True,
               lambda c, system: c.strip() + "<|eot_id|>"),
    "qwen2": (QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", True,
              lambda c, system: c + "<|im_end|>"),
    # Mistral puts the system prompt in the LAST user message only: the prompt before an answer is
    # no prefix of a conversation with a system prompt, but the space after [/INST] is still learnt.
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", False,
                lambda c, system: " " + c.strip() + "</s>"),
}
STOPS = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "mistral": "</s>"}

WORDS = ("the quick brown fox jumps over a lazy dog . hello world naïve café 日本語 emoji 🙂 42 2024 "
         "what is two plus two ? it is four , thanks you are welcome").split(" ")
SYSTEM = {"role": "system", "content": "You are terse.  "}
TALK = [{"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": " it is four. "},
        {"role": "user", "content": "thanks 🙂\nnaïve café"},
        {"role": "assistant", "content": "yes , you are welcome 42\n\nbye"}]  # "▁" + "y": two tokens
CONVERSATIONS = [TALK, [SYSTEM] + TALK, TALK[:2], [SYSTEM] + TALK[:2]]
PROMPTS = [TALK[:1], TALK[:3], [SYSTEM] + TALK[:3]]


def corpus(n=300, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]


def make_tokenizer(directory: str, family: str, template: str = None) -> str:
  """A small BPE tokenizer.json with the family's special tokens and chat template in tokenizer_config.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  source, specials, bos, eos, byte_level, _ = FAMILIES[family]
  tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
  if byte_level:
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(corpus()) + "?.,\n🙂"))
  tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template or source}
  if bos:
    config["bos_token"] = bos
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return directory


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  d = make_tokenizer(str(tmp_path_factory.mktemp(request.param)), request.param)
  return request.param, hf_tokenizer.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)


def hand_mask(name, ref, messages, answer=None):
  """The assistant mask from spans found by hand in transformers' text: each assistant content as
  the template writes it, with its end token; a token is in when it overlaps a span."""
  text = ref.apply_chat_template(messages, tokenize=False)
  system = messages[0]["role"] == "system"
  spans, at = [], 0
  for m in messages:
    if m["role"] == "assistant":
      piece = (answer or FAMILIES[name][5])(m["content"], system)
      at = text.index(piece, at)
      spans.append((at, at + len(piece)))
      at += len(piece)
  enc = ref(text, add_special_tokens=False, return_offsets_mapping=True)
  return [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]


def test_ids_and_masks_match_transformers_and_hand_built_spans(family):
  name, mine, ref = family
  for messages in CONVERSATIONS:
    ids, mask = T.apply_chat_template(mine, messages, "hf")
    assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"], messages
    assert mask == hand_mask(name, ref, messages), (name, messages)
    last = max(i for i, m in enumerate(mask) if m)  # the answer's end token (Qwen2 writes "\n" after it)
    assert ids[last] == ref.convert_tokens_to_ids(STOPS[name]) and len(ids) - last <= 2
  for messages in PROMPTS:
    ids, mask = T.apply_chat_template(mine, messages, "hf", add_generation_prompt=True)
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids == want["input_ids"] and sum(mask) == 0, messages
  assert T.stop_id(mine, "hf") == ref.convert_tokens_to_ids(STOPS[name])


def test_generation_blocks_give_transformers_assistant_mask(tmp_path):
  """A template with {% generation %} blocks: its blocks are the mask, as in transformers."""
  marked = LLAMA3.replace("{{ content }}", "{% if message['role'] == 'assistant' %}{{ content.split("
                          "'<|end_header_id|>')[0] + '<|end_header_id|>\n\n' }}{% generation %}{{ "
                          "message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
                          "{{ content }}{% endif %}")
  d = make_tokenizer(str(tmp_path), "llama3", marked)
  mine, ref = hf_tokenizer.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
  for messages in CONVERSATIONS:
    ids, mask = T.apply_chat_template(mine, messages, "hf")
    want = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == want["input_ids"] and mask == want["assistant_masks"] and sum(mask) > 0
    assert mask == hand_mask("llama3", ref, messages)


def test_a_llama3_tokenizer_is_told_to_use_hf(family):
  name, mine, _ = family
  if name == "qwen2":  # it has <|im_start|>: chatml works
    T.check_template(mine, "chatml")
    return
  with pytest.raises(UserError, match=r"config.data.chat_template='chatml'.*use 'hf'"):
    T.check_template(mine, "chatml")
  T.check_template(mine, "hf")
  bare = pickle.loads(pickle.dumps(mine))
  bare.chat_template = None
  with pytest.raises(UserError, match=r"has no chat template"):
    T.check_template(bare, "hf")


def test_pickling_and_the_template_own_errors(family):
  import jinja2
  name, mine, _ = family
  again = pickle.loads(pickle.dumps(mine))
  assert T.apply_chat_template(again, TALK, "hf") == T.apply_chat_template(mine, TALK, "hf")
  if name == "mistral":  # the template's raise_exception
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
      T.apply_chat_template(mine, TALK[:1] + TALK[:1], "hf")


def test_preference_pairs_split_at_the_answer(family):
  """A pair's prompt is what the template writes before the answer; each completion its answer and
  end token. Without a system prompt that is the generation prompt itself."""
  from train import pairs
  name, mine, _ = family
  stop = T.stop_id(mine, "hf")
  for messages in (TALK[:1], TALK[:3], [SYSTEM] + TALK[:3]):
    prompt, chosen, rejected, cut = pairs.encode_pair(mine, messages, "it is four.", "yes 42", 512, "hf")
    assert not cut and chosen[-1] == rejected[-1] == stop
    assert mine.decode(chosen[:-1]).strip() == "it is four." and mine.decode(rejected[:-1]).strip() == "yes 42"
    if messages[0]["role"] != "system" or name != "mistral":
      assert prompt == T.apply_chat_template(mine, messages, "hf", add_generation_prompt=True)[0]


@pytest.mark.slow
def test_sft_trains_with_the_tokenizer_template(tmp_path, data_cache):
  """SFT of a tiny model from scratch on a Llama 3 style tokenizer with data.chat_template=hf: the
  loss falls; a chatml run on the same tokenizer stops at once, pointing at hf."""
  from configs import sft_tiny
  from train import loop
  d = make_tokenizer(str(tmp_path / "tok"), "llama3")
  c = sft_tiny.get_config()
  c.tokenizer.path, c.data.chat_template = d, "hf"
  c.data.cache_dir, c.data.num_documents = data_cache, 400
  c.model.vocab_size = 320
  c.seq_len, c.batch_size, c.steps, c.optim.warmup_steps = 256, 8, 40, 5
  c.log_every, c.eval_every, c.checkpoint_every = 5, 0, 40
  c.async_checkpoints = False
  loop.train(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert losses[-1] < 0.7 * losses[0], losses
  stored = hf_tokenizer.load_tokenizer(str(tmp_path / "run" / "tokenizer"))
  assert stored.chat_template == LLAMA3
  c.data.chat_template = "chatml"
  with pytest.raises(UserError, match=r"chat_template='chatml'.*use 'hf'"):
    loop.train(c, str(tmp_path / "chatml"))


def test_a_sentencepiece_tokenizer_model_with_a_template(tmp_path):
  """A tokenizer.model (Mistral v0.1-v0.3, Llama 2 style) with the Mistral template: its offsets
  come from sentencepiece, its ids and mask are the same as transformers'."""
  import io
  import sentencepiece as spm
  w = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_writer=w, model_type="bpe", vocab_size=300, unk_id=0,
      bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
      user_defined_symbols=["[INST]", "[/INST]"], num_threads=1, minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(w.getvalue())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL}))
  mine = hf_tokenizer.load_tokenizer(str(tmp_path))
  ref = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), add_bos_token=False, legacy=False)
  assert type(mine).__name__ == "SpecialsTokenizer" and T.stop_id(mine, "hf") == 2
  for messages in CONVERSATIONS:
    ids, mask = T.apply_chat_template(mine, messages, "hf")
    assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert mask == hand_mask("mistral", ref, messages), messages


def test_qwen2_template_is_chatml_with_its_default_system_prompt(tmp_path):
  """On a tokenizer with <|im_start|>, Kiln's hand-written chatml (ids and mask) is what Qwen2's
  template writes once its default system prompt is added."""
  mine = hf_tokenizer.load_tokenizer(make_tokenizer(str(tmp_path), "qwen2"))
  system = {"role": "system", "content": "You are a helpful assistant."}
  for messages in CONVERSATIONS:
    with_system = messages if messages[0]["role"] == "system" else [system] + messages
    assert T.apply_chat_template(mine, messages, "hf") == T.apply_chat_template(mine, with_system, "chatml")


def test_an_unknown_template_name_is_named():
  from configs import sft_tiny
  from train.validate import validate
  c = sft_tiny.get_config()
  c.data.chat_template = "llama3"
  with pytest.raises(UserError, match=r"^config\.data\.chat_template='llama3': use chatml \| llama2 \| hf"):
    validate(c, num_devices=8)


def test_chat_template_jinja_wins_and_is_stored_with_the_run(tmp_path):
  """chat_template.jinja overrides tokenizer_config.json's template (as in transformers) and is
  copied into a run's DIR/tokenizer/ with the other files."""
  from train import run_tokenizer
  d = make_tokenizer(str(tmp_path / "src"), "llama3")
  own = LLAMA3.replace("'<|eot_id|>'", "'.<|eot_id|>'")
  (tmp_path / "src" / "chat_template.jinja").write_text(own)
  mine, ref = hf_tokenizer.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
  assert mine.chat_template == own
  ids, mask = T.apply_chat_template(mine, TALK, "hf")
  assert ids == ref.apply_chat_template(TALK, tokenize=True, return_dict=True)["input_ids"]
  assert mask == hand_mask("llama3", ref, TALK, lambda c, _: c.strip() + ".<|eot_id|>")  # "." is learnt too
  assert run_tokenizer.copy_hf_files(d, str(tmp_path / "run"))
  assert hf_tokenizer.load_tokenizer(str(tmp_path / "run")).chat_template == own
