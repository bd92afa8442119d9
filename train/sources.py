"""Documents of a split, streamed from `config.data.source`, and a cheap identity for them.

Sources (`config.data.source`):
- "builtin": generated word problems (+ English prose from Python itself for pretraining),
  see train/corpus.py. Eval = the fixed held-out problems (never in training).
- "text": files matching `data.path` (glob); one document per blank-line-separated paragraph.
- "jsonl" | "parquet" | "hf_disk": records of `data.path` (glob) files, JSON lines, parquet rows
  or a `datasets` save_to_disk directory (train/formats.py); pretrain `{"text": ...}` (key =
  data.text_key), sft `{"messages": [{"role", "content"}, ...]}` or `{"prompt": ...,
  "completion": ...}` (two strings, or TRL's two lists of messages, joined). Bad records raise
  UserError naming `file:line` (`file:row i`).
- "tfds": `data.tfds_name` read with `tfds.data_source`, or (name empty) the local
  `data.path` / `data.eval_path` files converted once into a TFDS array_record dataset by
  `KilnFiles` (files ending .jsonl are JSONL, others text) and read back with
  `builder.as_data_source()`; TFDS writes and reads array_record without tensorflow.
Without an eval file / eval split, every 50th document (index % 50 == 0) is held out;
data.max_documents caps how many documents of a split are read (before the hold-out).

Files are UTF-8: a byte that is not raises UserError naming `file:line` and the byte's offset.
A document is a string (pretrain) or a list of {"role", "content"} messages (sft).
`iter_documents` streams them, so a split never has to fit in memory; `fingerprint`
identifies a file / TFDS split by names, sizes and mtimes without reading it.

What happens to an SFT conversation, a preference pair or an RL prompt longer than its limit is
`data.overlong` (`overlong`); `Counts` says how many of a split were dropped or cut, for the start
line of a stage and its one warning line (`Counts.warning`).
"""
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile

from etils import epath

from configs.errors import UserError
from train import corpus, formats, shards
from train.files import is_url
from train.formats import jsonl_records, utf8_lines  # noqa: F401  (sources.jsonl_records: the old name)

FILE_SOURCES = ("text",) + formats.FORMATS  # config.data.source values read from data.path files
SOURCES = ("builtin",) + FILE_SOURCES + ("tfds",)
EVAL_EVERY = shards.EVAL_EVERY  # without an eval file, documents with index % 50 == 0 are held out
BUILTIN_SEED = 0  # the built-in corpus is the same for every run
BUILTIN_TOKENIZER_PROBLEMS = 20000  # builtin tokenizer corpus, fixed so pretrain and SFT share it


# ----------------------------------------------------------------------------- cache helpers


def cache_dir(config) -> str:
  """data.cache_dir: a local directory (docs/storage.md: the data cache stays local)."""
  if is_url(config.data.cache_dir):
    raise UserError(f"config.data.cache_dir={config.data.cache_dir!r}: the data cache is a local directory",
                    hint="data.path, the workdir and init_from may be gs://; the cache holds what is made from them")
  return os.path.expanduser(config.data.cache_dir or "~/.cache/kiln")


def stable_hash(*parts) -> str:
  """Short stable hash of JSON-able parts."""
  h = hashlib.sha1()
  for p in parts:
    h.update(json.dumps(p, sort_keys=True, ensure_ascii=False).encode())
  return h.hexdigest()[:20]


def publish(tmp: str, final: str) -> None:
  """Atomically renames a finished temp dir into place; if another process won, keeps theirs."""
  try:
    os.rename(tmp, final)
  except OSError:
    if not os.path.isdir(final):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def _stats(paths) -> list:
  """[(absolute path, size, mtime_ns)] of local files (and of the files of hf_disk directories):
  changes whenever a file is rewritten."""
  return [s for p in paths for s in formats.stats(p)]


# ----------------------------------------------------------------------------- over-long records

OVERLONG = ("drop", "truncate")


def overlong(config) -> str:
  """config.data.overlong, checked: what becomes of an SFT conversation, a preference pair or a
  JSONL RL prompt longer than its limit ("drop" | "truncate"); pretraining text is always split."""
  mode = config.data.get("overlong", "drop")
  if mode not in OVERLONG:
    raise UserError(f"config.data.overlong={mode!r}: use drop | truncate")
  return mode


@dataclasses.dataclass(frozen=True)
class Counts:
  """What became of the `total` records of a split: `dropped` / `truncated` for being longer than
  `limit` ("config.seq_len=128"), `identical` pairs (chosen == rejected) skipped; `mode` is
  data.overlong. Every process reads the same files, so every process counts the same."""
  what: str                # "train conversations"
  limit: str
  mode: str = "drop"
  total: int = 0
  dropped: int = 0
  truncated: int = 0
  identical: int = 0

  @property
  def kept(self) -> int:
    return self.total - self.dropped - self.identical

  def _parts(self, verb: bool) -> list[str]:
    out = []
    if self.dropped:
      out.append(f"{self.dropped:,} longer than {self.limit} " + ("were dropped" if verb else "dropped"))
    if self.truncated:
      out.append(f"{self.truncated:,} " + ("were cut to " if verb else "cut to ") + self.limit)
    if self.identical:
      out.append(f"{self.identical:,} with chosen == rejected " + ("were skipped" if verb else "skipped"))
    return out

  def note(self) -> str:
    """For the start line: "19,446 train conversations (154 longer than config.seq_len=128 dropped)"."""
    parts = self._parts(verb=False)
    return f"{self.kept:,} {self.what}" + (f" ({', '.join(parts)})" if parts else "")

  def warning(self) -> str:
    """One line when records were dropped, cut or skipped, saying which key changes it; else ""."""
    parts = self._parts(verb=True)
    if not parts:
      return ""
    fix = {"drop": "config.data.overlong=truncate keeps them, cut to fit",
           "truncate": "config.data.overlong=drop skips them instead"}[self.mode]
    return (f"warning: of {self.total:,} {self.what}, {'; '.join(parts)}"
            + (f" ({fix})" if self.dropped or self.truncated else ""))

  def check(self, origin: str) -> None:
    """UserError naming `origin` when records were read but none is left to train on."""
    if self.total and not self.kept:
      why = " or ".join(w for n, w in ((self.dropped, f"are longer than {self.limit}"),
                                       (self.identical, "have chosen == rejected")) if n)
      key = self.limit.split("=")[0]
      hint = {"drop": f"raise {key} or set config.data.overlong=truncate",
              "truncate": f"raise {key}: cut to it, none keeps a token to train on"}[self.mode]
      raise UserError(f"{origin}: all {self.total:,} {self.what} {why}; nothing is left",
                      hint=hint if self.dropped else "give pairs whose chosen and rejected answers differ")


def origin(config, split: str) -> str:
  """Where a split's records come from, for errors: the file pattern, or the built-in corpus."""
  d = config.data
  if d.source in FILE_SOURCES or (d.source == "tfds" and not d.tfds_name):
    key = "eval_path" if (split == "eval" and d.eval_path) else "path"
    return f"config.data.{key}={d[key]!r}"
  return f"config.data.tfds_name={d.tfds_name!r}" if d.source == "tfds" else f"the built-in {split} data"


# ----------------------------------------------------------------------------- records


def _normalize(rec, text_key: str, where: str) -> dict:
  """A raw record as {"text": str | None, "messages": list | None}; UserError names `where`."""
  if not isinstance(rec, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
  text, messages = rec.get(text_key), rec.get("messages")
  if "prompt" in rec or "completion" in rec:
    messages = _prompt_completion(rec.get("prompt"), rec.get("completion"), where)
  if text is not None and not isinstance(text, str):
    raise UserError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
  if messages is not None:
    messages = formats.messages(messages, where)
  if text is None and messages is None:
    raise UserError(f"{where}: record has none of {text_key!r}, 'messages', 'prompt'/'completion'")
  return {"text": text, "messages": messages}


def _prompt_completion(prompt, completion, where: str) -> list:
  """The conversation of a prompt-completion record: two strings (a user turn and the assistant's
  answer), or TRL's conversational form, two lists of messages."""
  if isinstance(prompt, str) and isinstance(completion, str):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
  if isinstance(prompt, list) and isinstance(completion, list):
    return formats.messages(prompt, where, "prompt") + formats.messages(completion, where, "completion")
  raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages")


def _select(rec: dict, objective: str, where: str):
  """The document an objective trains on: text (pretrain) or messages (sft)."""
  doc = rec["text"] if objective == "pretrain" else rec["messages"]
  if not doc:
    want = "text" if objective == "pretrain" else "'messages' or 'prompt'/'completion'"
    raise UserError(f"{where}: objective {objective!r} needs {want} in every record")
  return doc


def _file_records(path: str, text_key: str, fmt: str):
  """Yields (where, normalized record) of one file: the paragraphs of a text file, the records of
  a jsonl / parquet file or an hf_disk directory (train/formats.py)."""
  if fmt != "text":
    for where, rec in formats.read(fmt, path):
      yield where, _normalize(rec, text_key, where)
    return
  lines = (line for _, line in utf8_lines(path))
  for i, para in enumerate(_paragraphs(lines)):
    yield f"{path}:paragraph {i}", {"text": para, "messages": None}


def _paragraphs(lines):
  """Non-empty blank-line-separated paragraphs of a stream of lines, stripped, one at a time."""
  para = []
  for line in itertools.chain(lines, [""]):
    if line.strip():
      para.append(line)
    elif para:
      yield "".join(para).strip()
      para = []


# ----------------------------------------------------------------------------- tfds


def _tfds():
  """tensorflow_datasets, imported where a TFDS source is read: a heavy import the other sources skip."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("config.data.source='tfds' needs tensorflow-datasets: pip install -e '.[tfds]'") from e
  return tfds


@functools.cache
def kiln_files_builder():
  """The KilnFiles builder class, defined (and registered with TFDS as "kiln_files") on first use."""
  tfds = _tfds()

  class KilnFiles(tfds.core.GeneratorBasedBuilder):
    """TFDS dataset of local text / JSONL files: split 'train' from `train_files`, 'eval' from `eval_files`."""

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to find; also skips TFDS's lookup of the module's resource path,
    # which needs the `importlib_resources` package for classes inside a package.
    code_path = None

    def __init__(self, *, train_files=(), eval_files=(), text_key="text", **kwargs):
      self._split_files = {"train": list(train_files), "eval": list(eval_files)}
      self._text_key = text_key
      super().__init__(**kwargs)

    def _info(self):
      message = {"role": tfds.features.Text(), "content": tfds.features.Text()}
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "messages": tfds.features.Sequence(message)}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(f) for s, f in self._split_files.items() if f}

    def _generate_examples(self, files):
      for path in files:
        for where, rec in _file_records(path, self._text_key, "jsonl" if path.endswith(".jsonl") else "text"):
          yield where, {"text": rec["text"] or "", "messages": rec["messages"] or []}

  return KilnFiles


def __getattr__(name):  # `sources.KilnFiles` still works, without importing TFDS at import time
  if name == "KilnFiles":
    return kiln_files_builder()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _local_files(config) -> tuple[list[str], list[str]]:
  d = config.data
  return formats.files(d.path, "data.path"), (formats.files(d.eval_path, "data.eval_path") if d.eval_path else [])


def _local_tfds(config) -> dict:
  """Builds (once, atomically) the KilnFiles dataset of data.path / data.eval_path; its data sources."""
  KilnFiles = kiln_files_builder()
  train, evals = _local_files(config)
  key = stable_hash("kilnfiles", str(KilnFiles.VERSION), config.data.text_key,
                    _stats(train), _stats(evals))
  data_dir = os.path.join(cache_dir(config), "tfds", key)
  if not os.path.isdir(data_dir):
    os.makedirs(os.path.dirname(data_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(data_dir), prefix=f".{key}.")
    KilnFiles(train_files=train, eval_files=evals, text_key=config.data.text_key, data_dir=tmp,
              file_format="array_record").download_and_prepare()
    publish(tmp, data_dir)
  return KilnFiles(data_dir=data_dir, file_format="array_record").as_data_source()


def _tfds_split(config, split: str) -> tuple[str, bool]:
  """(TFDS split name to read, whether every 50th document of it is held out)."""
  d = config.data
  eval_split = d.tfds_eval_split or ("eval" if not d.tfds_name and d.eval_path else "")
  return (eval_split if (split == "eval" and eval_split) else d.tfds_split), not eval_split


def _named_source(config, split_name: str):
  d = config.data
  kiln_files_builder()  # registers "kiln_files", as importing this module did before the import went lazy
  return _tfds().data_source(d.tfds_name, split=split_name, data_dir=d.tfds_data_dir or None)


def _tfds_docs(source, config, name: str, indices=None):
  """Yields the documents of a TFDS data source (Text arrives as bytes, sequences as dict of lists),
  or only those at `indices` (random access: the others are not read)."""
  d = config.data
  for i in indices if indices is not None else range(_tfds_len(source, config)):
    ex, where = source[i], f"tfds {name}[{i}]"
    raw = {k: (_str(v, where) if isinstance(v, bytes) else v) for k, v in ex.items()}
    msgs = raw.get("messages")
    if isinstance(msgs, dict):  # {"role": [...], "content": [...]}
      msgs = [{"role": _str(r, where), "content": _str(c, where)} for r, c in zip(msgs["role"], msgs["content"])]
      raw["messages"] = msgs or None
    raw = {k: v for k, v in raw.items() if not (v is None or (isinstance(v, str) and not v))}
    yield _select(_normalize(raw, d.text_key, where), config.objective, where)


def _tfds_len(source, config) -> int:
  """Records of a TFDS split that are read: all, or the first data.max_documents."""
  return min(len(source), config.data.max_documents or len(source))


def _str(x, where: str) -> str:
  """A TFDS Text value as str; bytes that are not UTF-8 raise UserError naming `where`."""
  if not isinstance(x, bytes):
    return str(x)
  try:
    return x.decode()
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: not UTF-8 (byte 0x{x[e.start]:02x} at offset {e.start})") from None


# ----------------------------------------------------------------------------- documents


def _check(config, split: str) -> None:
  d, objective = config.data, config.objective
  if objective not in ("pretrain", "sft"):
    raise ValueError(f"train/data.py serves config.objective 'pretrain' or 'sft', not {objective!r}")
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
  if d.source not in SOURCES:
    raise UserError(f"config.data.source={d.source!r}; expected one of {' | '.join(SOURCES)}")
  if d.source == "text" and objective == "sft":
    raise UserError("config.data.source='text' has no conversations; sft needs builtin, tfds or one of "
                    f"{formats.FORMATS}")


def _holdout(docs, split: str, held_out: bool):
  """Deterministic 1/50 hold-out when `held_out`: documents with index % 50 == 0 are eval."""
  if not held_out:
    return docs
  return (doc for i, doc in enumerate(docs) if (i % EVAL_EVERY == 0) == (split == "eval"))


def _builtin(config, split: str) -> list:
  n, pretrain = config.data.num_documents, config.objective == "pretrain"
  if split == "eval":
    problems = corpus.heldout_problems(max(1, n // EVAL_EVERY))
    return [corpus.problem_text(p) if pretrain else corpus.conversation(p)["messages"]
            for p in problems]
  if pretrain:
    return corpus.pretrain_documents(BUILTIN_SEED, n)
  return [c["messages"] for c in corpus.sft_conversations(BUILTIN_SEED, n, config.data.builtin_slip)]


def iter_documents(config, split: str):
  """The documents of a split, one at a time: strings (pretrain) or message lists (sft).

  Checks the config now; reads (and builds a local TFDS dataset) only when iterated.
  """
  _check(config, split)
  return _documents(config, split)


def _documents(config, split: str):
  d, objective = config.data, config.objective
  if d.source == "builtin":
    yield from _builtin(config, split)
  elif d.source in FILE_SOURCES:
    key = "eval_path" if (split == "eval" and d.eval_path) else "path"
    records = (_select(rec, objective, where) for f in formats.files(d[key], f"data.{key}")
               for where, rec in _file_records(f, d.text_key, d.source))
    yield from _holdout(itertools.islice(records, d.max_documents or None), split, not d.eval_path)
  else:
    name, held_out = _tfds_split(config, split)
    source = _named_source(config, name) if d.tfds_name else _local_tfds(config)[name]
    docs = _tfds_docs(source, config, f"{d.tfds_name or 'kiln_files'}/{name}")
    yield from _holdout(docs, split, held_out)


def shard_records(config, split: str, index: int, count: int, start: int = 0, seek=shards.NO_SEEK):
  """(where, record, after) of a file source's records index + (start + j) * count, j = 0, 1, ...
  (shard `index` of `count`, from its `start`-th record on; `seek`: where the reader stopped after
  record start - 1), decoding no other record (train/shards.py). Records as train/formats.py reads them."""
  d = config.data
  key = "eval_path" if (split == "eval" and d.eval_path) else "path"
  paths, held_out = formats.files(d[key], f"data.{key}"), not d.eval_path
  first = index + start * count
  targets = (shards.raw_index(j, split, held_out) for j in itertools.count(first, count))
  if d.max_documents:
    targets = itertools.takewhile(lambda r: r < d.max_documents, targets)
  resumed_at = shards.raw_index(first - count, split, held_out) + 1 if start else 0
  return shards.records(d.source, paths, targets, seek, resumed_at)


def shard_documents(config, split: str, index: int, count: int, start: int = 0, seek=shards.NO_SEEK):
  """(document, after) of documents index + (start + j) * count, j = 0, 1, ... of a split (shard
  `index` of `count`, from its `start`-th document on), in the order of iter_documents; `after`:
  the `seek` that resumes after it. Files and TFDS splits decode only these records."""
  _check(config, split)
  d, first = config.data, index + start * count
  if d.source in FILE_SOURCES:
    for where, rec, after in shard_records(config, split, index, count, start, seek):
      doc = rec["text"] if d.source == "text" else _select(_normalize(rec, d.text_key, where), config.objective, where)
      yield doc, after
    return
  if d.source != "tfds":
    docs = itertools.islice(_documents(config, split), first, None, count)
  else:
    name, held_out = _tfds_split(config, split)
    source = _named_source(config, name) if d.tfds_name else _local_tfds(config)[name]
    n = _tfds_len(source, config)
    indices = itertools.takewhile(lambda i: i < n, (shards.raw_index(j, split, held_out)
                                                    for j in itertools.count(first, count)))
    docs = _tfds_docs(source, config, f"{d.tfds_name or 'kiln_files'}/{name}", indices)
  for doc in docs:
    yield doc, shards.NO_SEEK


def load_documents(config, split: str) -> list:
  """All the documents of a split in a list (small corpora and tests)."""
  return list(iter_documents(config, split))


def fingerprint(config, split: str) -> dict:
  """What the documents of a file / TFDS split depend on, without reading them (not builtin)."""
  _check(config, split)
  d = config.data
  out = dict(source=d.source, split=split, objective=config.objective, text_key=d.text_key,
             max_documents=d.max_documents)
  if d.source == "builtin":
    raise ValueError("the builtin corpus is identified by its content (stable_hash of documents)")
  if d.source in FILE_SOURCES:
    key = "eval_path" if (split == "eval" and d.eval_path) else "path"
    return dict(out, files=_stats(formats.files(d[key], f"data.{key}")), held_out=not d.eval_path)
  name, held_out = _tfds_split(config, split)
  out.update(tfds_split=name, held_out=held_out)
  if not d.tfds_name:  # the local KilnFiles build is a function of these files
    train, evals = _local_files(config)
    return dict(out, files=_stats(train) + _stats(evals))
  info = _named_source(config, name).dataset_info
  folder = epath.Path(info.data_dir)
  files = [(p.name, p.stat().length, p.stat().mtime) for p in sorted(folder.iterdir())]
  return dict(out, tfds_name=d.tfds_name, data_dir=os.fspath(folder), files=files)
