"""Preference data: (prompt, chosen, rejected) -> padded token arrays -> batches (reward model, DPO).

Records (`config.data.source`):
- "jsonl" | "parquet" | "hf_disk": the records of `data.path` (glob; train/formats.py), either a pair
    {"prompt": str | "messages": [{"role", "content"}, ...], "chosen": str, "rejected": str}
  or a ranking, best first, that gives all k(k-1)/2 (winner, loser) pairs
    {"prompt": ... | "messages": ..., "responses": [best, ..., worst]},
  or a pair in TRL's conversational form: "prompt" a list of messages, "chosen" / "rejected" lists of
  assistant turns (one turn reads as its content string), or with no prompt (TRL's implicit prompt)
  "chosen" / "rejected" two whole conversations: the messages both start with are the prompt, the
  rest of each (from an assistant turn) its completion.
  Held out: `data.eval_path`, else every 50th record (with all of its pairs). Errors name file:line
  (parquet / hf_disk: file:row i).
- "builtin": one pair per problem of train/corpus.py (`data.num_documents`; held-out problems for
  eval): chosen = the correct step-by-step completion; rejected = the same format with a wrong final
  number, or the right number without its <answer> tag.

A pair is rendered with `data.chat_template`: a completion is the answer's masked tokens (its
content and end token), the prompt all before them (the prompt with its generation prompt, as a
rule). A pair whose prompt + chosen or prompt + rejected is longer than `seq_len` is dropped
(`data.overlong` "drop") or fitted ("truncate": the prompt is cut from the left, then the completion
from the right; the pair then shares the shorter of the two prompts, a suffix of the other, so both
completions see the same x). A pair whose chosen and rejected tokens are the same teaches nothing
and is skipped. Both are counted (`PairSet.counts`, sources.Counts). A pair is stored as ONE row
[prompt | chosen | rejected] (right-padded to the set's longest row, rounded up to a multiple of 8):
tokens [L], prompt_length, lengths [2] (completion tokens). Prepared once, cached in
`data.cache_dir/pairs/<key>.npz`.

Batches (model inputs for model/transformer.py with branch_ids, see `packed_batch`): rows of
tokens, positions, segment_ids (0 pad), branch_ids (0 prompt, 1 chosen, 2 rejected) int32 [R, L];
the rejected branch attends to the prompt but not to the chosen tokens and its positions restart
after the prompt, so each completion is scored exactly as in its own row. Completion tokens (at
most K a row): targets, logit_slots (the slot whose logits predict the target), target_branch (1
chosen, 2 rejected, 0 none), target_pair (which pair of the row) int32 [R, K]; per pair: ends
[.., 2] (slot of the last chosen / rejected token), weight (0 = no pair), extra columns (e.g.
ref_logps [.., 2]).
- Unpacked (`make_batch`, data.pair_rows = 0): one pair a row, R = b, segment id 1, K the set's
  longest chosen + rejected rounded up to 8; per pair [b, ...]. Global batch s is pairs
  [s*B, (s+1)*B) of an endless per-epoch shuffle (seed config.seed); process p of P gets
  [s*B + p*b, s*B + (p+1)*b), b = B // P, as in train/data.py. Iterator state = {"step": s}.
- Packed (data.pair_rows = R): a step's pairs in R rows of L = K = 2 seq_len (r = R / P a process),
  pair g of a row its own segment (id g + 1), so attention never crosses pairs, nor branches within
  one (model/attention.py `attention_mask`; a dense mask: the einsum path, never splash); per pair
  slot [r, G], G = min(b, 2 b / r) (`Packing`). `plan` fills them: a step takes the pairs that waited
  from the step before, then new ones, up to b = B / P, best-fit decreasing; a pair that fits no row
  waits for the next step, so a step trains on at most B pairs (its loss: their mean). Static shapes
  for jit; few padding tokens when lengths vary (docs/performance.md, input pipeline). The cached
  pipeline plans each epoch's shuffle into global batches (state {"step": s} still), the stream
  each window (train/stream.py).
"""
import dataclasses
import hashlib
import os
import tempfile

import numpy as np

from configs.errors import UserError
from model import tokenizer as tokenizer_lib
from train import corpus, formats, sources
from train.reward_loss import ranking_to_pairs

PAIRS_VERSION = 3   # bump when the arrays change for the same records (it is in every cache key)
PAIRS_SEED = 7      # which rejected completion each built-in problem gets
SIDES = ("chosen", "rejected")
PAIR_ARRAYS = ("tokens", "prompt_lengths", "lengths")  # a PairSet's own columns (the rest: extras per pair)
COUNTS = ("total", "dropped", "truncated", "identical")  # scalars of the cached .npz next to the columns


@dataclasses.dataclass(frozen=True)
class PairSet:
  columns: dict     # tokens [N, L], prompt_lengths [N], lengths [N, 2] int32, extras [N, ...]
  pad_id: int
  key: str = ""     # cache identity of the arrays
  counts: sources.Counts | None = None  # pairs read, dropped / cut for seq_len, skipped as identical
  completions: int = 0  # K, target slots of a batch row; 0: the longest pair's chosen + rejected

  @property
  def truncated(self) -> int:
    """Pairs cut to fit seq_len."""
    return self.counts.truncated if self.counts else 0

  def __len__(self):
    return len(self.columns["tokens"])

  def with_columns(self, **extra):
    for k, v in extra.items():
      if len(v) != len(self):
        raise ValueError(f"column {k!r} has {len(v)} rows for {len(self)} pairs")
    return dataclasses.replace(self, columns={**self.columns, **extra})


# ----------------------------------------------------------------------------- records


def _bad(where, msg):
  return UserError(f"{where}: {msg}")


def parse_record(rec, where: str) -> list[tuple[list, str | list, str | list]]:
  """A record -> [(prompt messages, chosen, rejected)]; UserError names `where`. A completion is
  a string, or its messages when it is more than one assistant turn (TRL's conversational form)."""
  if not isinstance(rec, dict):
    raise _bad(where, f"expected a JSON object, got {type(rec).__name__}")
  if "prompt" not in rec and "messages" not in rec and all(isinstance(rec.get(k), list) for k in SIDES):
    return [implicit_prompt(rec["chosen"], rec["rejected"], where)]
  if ("prompt" in rec) == ("messages" in rec):
    raise _bad(where, "needs exactly one of 'prompt' (a string or a list of messages) or 'messages' "
                      "(a list), or 'chosen' and 'rejected' as whole conversations (the prompt: their shared start)")
  key = "prompt" if "prompt" in rec else "messages"
  if isinstance(rec[key], str) and key == "prompt":
    messages = [{"role": "user", "content": rec["prompt"]}]
  elif isinstance(rec[key], list):
    messages = _prompt(formats.messages(rec[key], where, key), where, repr(key))
  else:
    raise _bad(where, f"{key!r} must be {'a string or ' * (key == 'prompt')}a list of messages")
  if "responses" in rec:
    resp = rec["responses"]
    if not isinstance(resp, list) or len(resp) < 2 or not all(isinstance(r, str) for r in resp):
      raise _bad(where, "'responses' must be a list of at least 2 strings (best first)")
    return [(messages, w, l) for w, l in ranking_to_pairs(resp)]
  if not all(isinstance(rec.get(k), (str, list)) for k in SIDES):
    raise _bad(where, "needs 'chosen' and 'rejected', strings or lists of assistant messages "
                      "(or a 'responses' ranking)")
  chosen, rejected = (_completion(rec[k], where, k) for k in SIDES)
  return [(messages, chosen, rejected)]


def implicit_prompt(chosen: list, rejected: list, where: str) -> tuple[list, str | list, str | list]:
  """(prompt, chosen, rejected) of two whole conversations (TRL's implicit prompt): the prompt is
  the messages they share from the start, each completion the rest, from its first assistant turn."""
  c, r = formats.messages(chosen, where, "chosen"), formats.messages(rejected, where, "rejected")
  n = 0
  while n < min(len(c), len(r)) - 1 and c[n] == r[n]:  # each keeps >= 1 message
    n += 1
  if n == 0:
    raise _bad(where, "'chosen' and 'rejected' share no first message: with no 'prompt', the prompt is "
                      "the messages both conversations start with")
  if c[n]["role"] != "assistant" or r[n]["role"] != "assistant":
    raise _bad(where, f"'chosen' and 'rejected' first differ at message {n}, not an assistant turn: with no "
                      "'prompt', each completion is what follows the shared start, from an assistant turn")
  prompt = _prompt(c[:n], where, "the shared start of 'chosen' and 'rejected'")
  return prompt, _completion(c[n:], where, "chosen"), _completion(r[n:], where, "rejected")


def _prompt(messages: list, where: str, what: str) -> list:
  if messages[-1]["role"] == "assistant":
    raise _bad(where, f"{what} is the prompt: it must not end with an assistant turn")
  return messages


def _completion(value, where: str, key: str) -> str | list:
  """A completion: a string; or assistant-first, assistant-last messages (one: its content)."""
  if isinstance(value, str):
    return value
  turns = formats.messages(value, where, key)
  if turns[0]["role"] != "assistant" or turns[-1]["role"] != "assistant":
    raise _bad(where, f"{key!r} must start and end with an assistant turn, got roles "
                      f"{[m['role'] for m in turns]}")
  return turns[0]["content"] if len(turns) == 1 else turns


def read(path: str, fmt: str = "jsonl"):
  """Yields (where, [(messages, chosen, rejected)]) per record of a file in format `fmt`."""
  for where, rec in formats.read(fmt, path):
    yield where, parse_record(rec, where)


def wrong_answer(p: corpus.Problem, rng: np.random.Generator) -> str:
  """The completion format with a wrong final number (last step and tag agree with each other):
  off by 1-3 (a slip in the last digit) or by 10-20 (a wrong carry)."""
  a = int(p.answer)
  d = int(rng.choice([-3, -2, -1, 1, 2, 3, -20, -10, 10, 20]))
  wrong = a + d if a + d >= 0 else a + abs(d)
  stem = p.solution[: p.solution.rindex(f"= {a}.")]
  return f"{stem}= {wrong}. <answer>{wrong}</answer>"


def no_answer_tag(p: corpus.Problem) -> str:
  """The right number, but without the <answer> tag."""
  return f"{p.solution} {p.answer}"


def builtin_records(problems, seed: int = PAIRS_SEED) -> list[tuple[list, str, str]]:
  """One (prompt, chosen, rejected) per problem; half wrong numbers, half missing tags."""
  rng = np.random.default_rng(seed)
  out = []
  for p in problems:
    bad = wrong_answer(p, rng) if rng.random() < 0.5 else no_answer_tag(p)
    out.append(([{"role": "user", "content": p.question}], corpus.format_completion(p), bad))
  return out


def records(config, split: str):
  """(where, pair) of a split, and the split's cache identity (builtin: hashed; files: stats)."""
  d = config.data
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
  if d.source == "builtin":
    n = d.num_documents
    problems = (corpus.heldout_problems(max(1, n // sources.EVAL_EVERY)) if split == "eval"
                else corpus.train_problems(sources.BUILTIN_SEED, n))
    recs = builtin_records(problems)
    return [(f"builtin {split}[{i}]", r) for i, r in enumerate(recs)], sources.stable_hash(recs)
  if d.source not in formats.FORMATS:
    raise ValueError(f"config.data.source={d.source!r}: preference data is 'builtin' or one of {formats.FORMATS}")
  key = "eval_path" if (split == "eval" and d.eval_path) else "path"
  files = formats.files(d[key], f"data.{key}")
  held_out = not d.eval_path
  identity = [s for f in files for s in formats.stats(f)]
  out, i = [], 0
  for f in files:
    for where, pairs in read(f, d.source):
      if d.max_documents and i >= d.max_documents:
        break
      if not held_out or (i % sources.EVAL_EVERY == 0) == (split == "eval"):
        out += [(where, p) for p in pairs]
      i += 1
  return out, [identity, held_out, d.max_documents]


# ----------------------------------------------------------------------------- tokens


def encode(tok, messages, completion: str | list, template: str) -> tuple[list[int], int]:
  """(prompt + completion ids ending with the end token, prompt length). A completion is an assistant
  turn's content: its masked tokens (content and end token) are the completion, all before them the
  prompt (a template may rewrite earlier turns, so the generation prompt need not be a prefix). Or
  messages (several turns): every token after the generation prompt is the completion's."""
  turns = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
  full, mask = tokenizer_lib.apply_chat_template(tok, messages + turns, template)
  if not any(mask):
    raise ValueError(f"chat template {template!r} writes no assistant tokens for the completion")
  end = max(i for i, m in enumerate(mask) if m) + 1  # after the end token of the last turn
  if isinstance(completion, str):
    start = end
    while start and mask[start - 1]:
      start -= 1
    return full[:end], start
  prompt, _ = tokenizer_lib.apply_chat_template(tok, messages, template, add_generation_prompt=True)
  if full[:len(prompt)] != prompt:
    raise ValueError(f"chat template {template!r}: the generation prompt is not a prefix of the conversation")
  return full[:end], len(prompt)


def fit(ids: list[int], prompt_len: int, seq_len: int) -> tuple[list[int], int]:
  """Cuts the prompt from the left (keeping >= 1 token), then the completion from the right."""
  if len(ids) <= seq_len:
    return ids, prompt_len
  cut = min(len(ids) - seq_len, prompt_len - 1)
  return ids[cut:cut + seq_len], prompt_len - cut


def _round_up(n: int, multiple: int = 8) -> int:
  return -(-n // multiple) * multiple


def encode_pair(tok, messages, chosen, rejected, seq_len: int, template: str):
  """(prompt, chosen, rejected) id lists of a pair and whether it was cut to fit: each of prompt +
  completion fits in seq_len, and the two share the shorter of their two fitted prompts."""
  fitted, cut = [], False
  for completion in (chosen, rejected):
    ids, n_prompt = encode(tok, messages, completion, template)
    cut |= len(ids) > seq_len
    fitted.append(fit(ids, n_prompt, seq_len))
  n_prompt = min(n for _, n in fitted)  # cut from the left: the shorter prompt ends the longer one
  ids, n = fitted[0]
  if ids[n - n_prompt:n] != fitted[1][0][fitted[1][1] - n_prompt:fitted[1][1]]:
    raise ValueError(f"chat template {template!r}: the prompt's tokens depend on the completion")
  return ids[n - n_prompt:n], ids[n:], fitted[1][0][fitted[1][1]:], cut


def encode_fitted(tok, where: str, pair, seq_len: int, template: str, overlong: str = "drop"):
  """(what became of a (messages, chosen, rejected) pair: "kept" | "truncated" | "dropped" |
  "identical", its (prompt, chosen, rejected) ids or None), fitted to seq_len per `overlong`."""
  try:
    prompt, c, r, cut = encode_pair(tok, *pair, seq_len, template)
  except ValueError as e:
    raise _bad(where, str(e)) from None
  if cut and overlong == "drop":
    return "dropped", None
  if c == r:
    return "identical", None
  return ("truncated" if cut else "kept"), (prompt, c, r)


def encode_record(tok, seq_len: int, template: str, overlong: str, where: str, rec) -> list[tuple]:
  """The (prompt, chosen, rejected) ids of a record's pairs that are kept (streamed pairs)."""
  fitted = (encode_fitted(tok, where, p, seq_len, template, overlong) for p in parse_record(rec, where))
  return [triple for _, triple in fitted if triple is not None]


def pair_set(triples, pad_id: int, key: str = "", counts: sources.Counts | None = None,
             row_len: int = 0, completions: int = 0) -> PairSet:
  """[(prompt, chosen, rejected) id lists] -> PairSet of rows [prompt | chosen | rejected], padded to
  `row_len` tokens and `completions` target slots (0: the set's longest, rounded up to 8)."""
  if not triples:
    raise UserError("no preference pairs")
  rows = [list(p) + list(c) + list(r) for p, c, r in triples]
  tokens = np.full((len(rows), row_len or _round_up(max(map(len, rows)))), pad_id, np.int32)  # [N, L]
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  cols = {"tokens": tokens, "prompt_lengths": np.array([len(p) for p, _, _ in triples], np.int32),
          "lengths": np.array([[len(c), len(r)] for _, c, r in triples], np.int32)}
  return PairSet(cols, pad_id, key, counts, completions)


def encode_records(tok, recs, seq_len: int, template: str, key: str = "", overlong: str = "drop",
                   what: str = "pairs", origin: str = "") -> PairSet:
  """[(where, (messages, chosen, rejected))] -> PairSet of the pairs that fit (`overlong` "drop") or
  were fitted ("truncate") to seq_len and whose completions differ, with their Counts. A template
  error names `where`; none left names `origin` (default: the first record's file)."""
  kept, fate = [], {"dropped": 0, "truncated": 0, "identical": 0}
  for where, pair in recs:
    became, triple = encode_fitted(tok, where, pair, seq_len, template, overlong)
    if became != "kept":
      fate[became] += 1
    if triple is not None:
      kept.append(triple)
  counts = sources.Counts(what, f"config.seq_len={seq_len}", overlong, len(recs), **fate)
  if recs:
    counts.check(origin or recs[0][0].rsplit(":", 1)[0])
  return pair_set(kept, tok.pad_id, key, counts)


def load(config, tok, split: str) -> PairSet:
  """The pairs of a split, tokenized once and cached in data.cache_dir/pairs/<key>.npz."""
  d = config.data
  recs, identity = records(config, split)
  overlong = sources.overlong(config)
  key = sources.stable_hash(PAIRS_VERSION, d.source, split, config.seq_len,
                            tokenizer_lib.template_key(tok, d.chat_template), overlong,
                            hashlib.sha1(tok.model_proto).hexdigest(), identity)
  path = os.path.join(sources.cache_dir(config), "pairs", f"{key}.npz")
  if os.path.isfile(path):
    with np.load(path) as z:
      cols = {k: z[k] for k in z.files if k not in COUNTS}
      counts = sources.Counts(f"{split} pairs", f"config.seq_len={config.seq_len}", overlong,
                              **{k: int(z[k]) for k in COUNTS})
      return PairSet(cols, tok.pad_id, key, counts)
  ps = encode_records(tok, recs, config.seq_len, d.chat_template, key, overlong, f"{split} pairs",
                      sources.origin(config, split))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **{k: getattr(ps.counts, k) for k in COUNTS}, **ps.columns)
  os.replace(tmp, path)
  return ps


def load_file(path: str, tok, seq_len: int, template: str, overlong: str = "drop") -> PairSet:
  """Every pair of one file (no hold-out, no cache; its format from the path, formats.detect) that
  fits seq_len per `overlong`: for evaluation."""
  recs = [(w, p) for w, ps in read(path, formats.detect(path)) for p in ps]
  return encode_records(tok, recs, seq_len, template, overlong=overlong)


# ----------------------------------------------------------------------------- batches


def pair_row_len(seq_len: int) -> int:
  """L of a row that holds any pair: prompt + chosen and prompt + rejected fit in seq_len each, so
  [prompt | chosen | rejected] < 2 seq_len (rounded up to 8)."""
  return _round_up(2 * seq_len)


@dataclasses.dataclass(frozen=True)
class Packing:
  """One process's packed batch (`data.pair_rows` > 0): at most `pairs` pairs in `rows` rows of
  `row_len` tokens, at most `per_row` pairs a row."""
  pairs: int     # b: config.batch_size // processes
  rows: int      # r: config.data.pair_rows // processes
  row_len: int   # L = K: 2 seq_len, rounded up to 8
  per_row: int   # G: twice the rows' average b / r, at most b

  @staticmethod
  def of(config, process_count: int = 1):
    """The packing of config for one of process_count processes, or None (data.pair_rows = 0)."""
    rows = config.data.get("pair_rows", 0)
    if not rows:
      return None
    b, r = config.batch_size // process_count, rows // process_count
    return Packing(b, r, pair_row_len(config.seq_len), min(b, -(-2 * b // r)))


def check_packing(config, data_ways: int, num_processes: int) -> None:
  """UserError when config.data.pair_rows cannot split like the batch (processes, data axes,
  micro-batches) or the objective has no pairs."""
  rows, accum = config.data.get("pair_rows", 0), config.optim.grad_accum
  if not rows:
    return
  if config.objective not in ("reward_model", "dpo"):
    raise UserError(f"config.data.pair_rows={rows} packs preference pairs: not for config.objective="
                    f"{config.objective!r}", hint="set config.data.pair_rows=0")
  if rows > config.batch_size:
    raise UserError(f"config.data.pair_rows={rows} is more rows than the config.batch_size={config.batch_size} "
                    "pairs of a step", hint="0 gives every pair its own row")
  if rows % num_processes or rows % accum or (rows // accum) % data_ways:
    raise UserError(f"config.data.pair_rows={rows} must split over the {num_processes} processes and into "
                    f"config.optim.grad_accum={accum} micro-batches each divisible by the data axes ({data_ways})")


def plan(sizes, packing: Packing) -> list[list[list[int]]]:
  """Pairs of `sizes` (tokens each, in order) -> batches, each `packing.rows` rows of the indices of
  their pairs. A batch takes the pairs left over from the one before, then new ones, up to
  `packing.pairs`, and places them longest first, each into the row it fills best (best-fit
  decreasing; a row holds at most row_len tokens and per_row pairs). A pair that fits no row waits
  for the next batch; after the last pair the batches take what waits (so they may be smaller).
  Every batch places at least its longest pair (it fits an empty row), so the plan ends."""
  if len(sizes) and max(sizes) > packing.row_len:
    raise ValueError(f"a pair of {max(sizes)} tokens does not fit a row of {packing.row_len}")
  fresh, waiting, out = list(range(len(sizes)))[::-1], [], []
  while waiting or fresh:
    candidates = waiting + [fresh.pop() for _ in range(min(packing.pairs - len(waiting), len(fresh)))]
    free = np.full(packing.rows, packing.row_len)   # [r] tokens left per row
    groups, waiting = [[] for _ in range(packing.rows)], []
    for i in sorted(candidates, key=lambda i: -sizes[i]):   # stable: ties in arrival order
      fits = (free >= sizes[i]) & (np.array([len(g) for g in groups]) < packing.per_row)
      if not fits.any():
        waiting.append(i)
        continue
      row = int(np.argmin(np.where(fits, free, packing.row_len + 1)))
      groups[row].append(i)
      free[row] -= sizes[i]
    waiting.sort()   # arrival order
    out.append(groups)
  return out


def sizes_of(ps: PairSet) -> np.ndarray:
  """Tokens [N] of each pair's row [prompt | chosen | rejected]."""
  return ps.columns["prompt_lengths"] + ps.columns["lengths"].sum(-1)


def packed_batch(ps: PairSet, groups: list[list[int]], per_row: int, row_len: int, completions: int) -> dict:
  """Rows of pairs as model inputs: row i holds the pairs groups[i] (indices into ps) one after the
  other, pair g of a row its own segment (id g + 1; 0 pad) with branch ids 0 prompt, 1 chosen,
  2 rejected and positions restarting at 0 (the rejected branch: after the prompt).
  Per row [R, row_len]: tokens, positions, segment_ids, branch_ids; [R, completions]: targets,
  logit_slots (the slot whose logits predict the target), target_branch (1 chosen, 2 rejected, 0
  none), target_pair (g of the pair in its row). Per pair slot [R, per_row]: weight (1 a pair,
  0 empty), ends [.., 2] (slot of the last chosen / rejected token), extra columns [.., ...]."""
  c, R, G = ps.columns, len(groups), per_row
  rows = {k: np.zeros((R, row_len), np.int32) for k in ("positions", "segment_ids", "branch_ids")}
  rows["tokens"] = np.full((R, row_len), ps.pad_id, np.int32)
  slots = {k: np.zeros((R, completions), np.int32) for k in ("targets", "logit_slots", "target_branch", "target_pair")}
  ends, weight = np.zeros((R, G, 2), np.int32), np.zeros((R, G), np.float32)
  extras = {k: np.zeros((R, G) + v.shape[1:], np.float32) for k, v in c.items() if k not in PAIR_ARRAYS}
  for i, group in enumerate(groups):
    s = k = 0   # the next free token slot and target slot of row i
    for g, j in enumerate(group):
      p, (n_c, n_r) = int(c["prompt_lengths"][j]), c["lengths"][j].tolist()
      n, m = p + n_c + n_r, n_c + n_r
      rows["tokens"][i, s:s + n] = c["tokens"][j, :n]
      rows["positions"][i, s:s + n] = np.r_[0:p + n_c, p:p + n_r]
      rows["segment_ids"][i, s:s + n] = g + 1
      rows["branch_ids"][i, s:s + n] = np.repeat([0, 1, 2], [p, n_c, n_r])
      slots["targets"][i, k:k + m] = c["tokens"][j, p:n]
      # completion token t sits at slot s + p + t, predicted from the slot before it; the first rejected
      # token from the prompt's last
      before = np.arange(m)
      before[n_c:n_c + 1] = 0
      slots["logit_slots"][i, k:k + m] = s + p - 1 + before
      slots["target_branch"][i, k:k + m] = np.repeat([1, 2], [n_c, n_r])
      slots["target_pair"][i, k:k + m] = g
      ends[i, g] = [s + p + n_c - 1, s + n - 1]
      weight[i, g] = 1
      for key, v in extras.items():
        v[i, g] = c[key][j]
      s, k = s + n, k + m
  return {**rows, **slots, "ends": ends, "weight": weight, **extras}


def make_batch(ps: PairSet, rows: np.ndarray) -> dict:
  """Batch of pairs `rows` [b] (-1 = padding pair), one row each (`packed_batch` with one pair a
  row, the per-pair arrays [b, ...]): rows of the set's row length L, K target slots."""
  L = ps.columns["tokens"].shape[-1]
  K = ps.completions or _round_up(int(ps.columns["lengths"].sum(-1).max()))  # the longest pair's
  batch = packed_batch(ps, [[int(r)] if r >= 0 else [] for r in rows], 1, L, K)
  per_pair = {"weight", "ends"} | set(ps.columns) - set(PAIR_ARRAYS)
  return {k: v[:, 0] if k in per_pair else v for k, v in batch.items()}


def local_rows(step: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """Global positions [b] of process p's slice of global batch `step`."""
  if batch_size % process_count:
    raise ValueError(f"config.batch_size={batch_size} is not divisible by the {process_count} processes")
  b = batch_size // process_count
  return step * batch_size + process_index * b + np.arange(b)


class PairIterator:
  """This process's slices of the global batches of an endless per-epoch shuffle; resumable.

  With `pack` (this process's Packing, data.pair_rows): each epoch's shuffled pairs are planned
  into global batches of R = P r rows (`plan`, the same on every process), process p takes rows
  [p r, (p + 1) r) and their pairs; step s is batch s of the epochs' plans one after the other."""

  def __init__(self, ps: PairSet, batch_size: int, seed: int, process_index=0, process_count=1,
               pack: Packing | None = None):
    self.ps, self.B, self.seed, self.pack = ps, batch_size, seed, pack
    self.row_len = pack.row_len if pack else ps.columns["tokens"].shape[-1]  # L: tokens per pair row
    self.rows = pack.rows * process_count if pack else batch_size  # rows of a global batch
    self.p, self.P = process_index, process_count
    self._perms, self._plans, self._lengths = {}, {}, []   # _lengths[e]: batches of epoch e's plan
    self.set_state({"step": 0})

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.ps))
    return self._perms[epoch]

  def _plan(self, epoch: int) -> list:
    """Epoch `epoch`'s global batches: R rows of pair indices each."""
    if epoch not in self._plans:
      perm = self._perm(epoch)
      whole = dataclasses.replace(self.pack, pairs=self.B, rows=self.rows)
      self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
      self._plans[epoch] = [[perm[g].tolist() for g in groups] for groups in plan(sizes_of(self.ps)[perm], whole)]
    return self._plans[epoch]

  def _packed(self, step: int) -> dict:
    epoch = 0
    while step >= (n := self._length(epoch)):
      step, epoch = step - n, epoch + 1
    r = self.pack.rows
    groups = self._plan(epoch)[step][self.p * r:(self.p + 1) * r]
    return packed_batch(self.ps, groups, self.pack.per_row, self.row_len, self.row_len)

  def _length(self, epoch: int) -> int:
    while len(self._lengths) <= epoch:
      self._lengths.append(len(self._plan(len(self._lengths))))
    return self._lengths[epoch]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    self._step += 1
    if self.pack:
      return self._packed(self._step - 1)
    g = local_rows(self._step - 1, self.B, self.p, self.P)  # [b]
    n = len(self.ps)
    rows = np.array([self._perm(int(x) // n)[int(x) % n] for x in g])
    return make_batch(self.ps, rows)

  def get_state(self) -> dict:
    return {"step": self._step}

  def describe(self) -> str:
    return self.ps.counts.note() if self.ps.counts else f"{len(self.ps)} train pairs"

  def warning(self) -> str:
    return self.ps.counts.warning() if self.ps.counts else ""

  def set_state(self, state: dict) -> None:
    self._step = int(state["step"])


def ordered_batches(ps: PairSet, batch_size: int, process_index=0, process_count=1,
                    max_batches: int | None = None) -> list[dict]:
  """Every pair in order (at most max_batches global batches), the last padded with weight-0 pairs."""
  n = len(ps)
  num = -(-n // batch_size)
  num = min(num, max_batches) if max_batches else num
  out = []
  for s in range(num):
    g = local_rows(s, batch_size, process_index, process_count)
    out.append(make_batch(ps, np.where(g < n, g, -1)))
  return out


def make_batches(config, tok, split: str, process_index: int = 0, process_count: int = 1,
                 columns: dict | None = None):
  """train: an endless resumable PairIterator; eval: a list of the held-out batches."""
  ps = load(config, tok, split)
  if columns:
    ps = ps.with_columns(**columns)
  if split == "train":
    return PairIterator(ps, config.batch_size, config.seed, process_index, process_count,
                        Packing.of(config, process_count))
  return ordered_batches(ps, config.batch_size, process_index, process_count,
                         config.eval_batches or None)
