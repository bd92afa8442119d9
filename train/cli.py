"""The command line of every entry point: absl flags, `--workdir DIR`, `--config.KEY=VALUE`, and
errors a user can fix printed as one line plus a hint (exit code 2, no traceback).

`run` is app.run for every entry point (python -m train, train.pipeline, the tools): it checks
every `--config.KEY` against the config before absl parses it (ml_collections would fail with
`AttributeError: 'KEY'`), naming the closest existing key, and turns a UserError raised anywhere
(configs/errors.py) into `error: ...` / `hint: ...` on stderr. `--debug` or KILN_DEBUG=1 lets the
traceback through. The tools' options are a ConfigDict of configs/tools.py (`run_on_workdir`).
"""
import importlib.util
import os
import re
import sys
from typing import Callable

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from configs.errors import UserError, unknown
from train import cpu_tuning, files

DEBUG_ENV = "KILN_DEBUG"
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def debugging(argv) -> bool:
  """--debug on the command line or KILN_DEBUG set (not 0): show tracebacks of user errors."""
  return "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def config_spec(argv):
  """The value of `--config` in argv (`configs/x.py[:arg]`), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def split_spec(spec: str) -> tuple[str, str]:
  """`configs/x.py[:arg]` or `gs://bucket/x.py[:arg]` -> (path, arg)."""
  scheme, sep, rest = spec.rpartition("://")
  path, _, arg = rest.partition(":")
  return scheme + sep + path, arg


def local_config(argv: list) -> list:
  """argv with a `--config` URL (gs://bucket/x.py[:arg]) replaced by its local copy (train/files.py
  `local`), which --config then loads like any file."""
  def localize(spec):
    path, arg = split_spec(spec)
    return files.local(path) + (f":{arg}" if arg else "") if files.is_url(path) else spec
  out = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      flag, value = arg.split("=", 1)
      out[i] = f"{flag}={localize(value)}"
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      out[i + 1] = localize(argv[i + 1])
  return out


def load_config_file(spec: str):
  """`configs/x.py[:arg]` -> its get_config(arg), as --config loads it."""
  path, arg = split_spec(spec)
  if not os.path.isfile(path):
    raise UserError(f"--config {path}: no such file", hint="name a config file, e.g. --config configs/sft_tiny.py")
  module_spec = importlib.util.spec_from_file_location("kiln_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv, config) -> None:
  """Raises UserError for the first `--config.KEY` of argv that `config` lacks, with the closest key."""
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    node, name = config, "config"
    for part in re.sub(r"\[[^]]*\]", "", match.group(1)).split("."):
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        raise UserError(f"{name} is a value, not a section: no {name}.{part}", hint=f"set it with --{name}=VALUE")
      if part not in node:
        raise unknown(f"{name}.{part}", part, list(node.keys()), prefix=f"{name}.")
      node, name = node[part], f"{name}.{part}"


def _parse_flags(argv):
  """absl's parse, with its errors (a value of the wrong type, a missing flag) as UserError."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(str(e).splitlines()[0], hint="--helpshort lists the flags") from e


def run(main: Callable, options=None, define_flags: Callable = lambda: None) -> None:
  """app.run(main) of an entry point. `options`: the ConfigDict of the tool's `--config`, or None:
  the config file that `--config` names; `define_flags()` runs once its overrides are checked (a
  config-dict flag parses them when defined)."""
  flags.DEFINE_bool("debug", False, f"Show the traceback of an error (or set {DEBUG_ENV}=1).")
  argv = sys.argv
  try:
    sys.argv[:] = argv = local_config(sys.argv)
    spec = config_spec(argv) if options is None else None
    config = options if options is not None else load_config_file(spec) if spec else None
    if config is not None:
      check_overrides(argv, config)
    define_flags()
    app.run(main, flags_parser=_parse_flags)
  except UserError as e:
    if debugging(argv):
      raise
    sys.stderr.write(f"error: {e}\n" + (f"hint: {e.hint}\n" if e.hint else ""))
    sys.exit(2)


def no_arguments(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}", hint="options are --flag=VALUE or --config.KEY=VALUE")


def run_on_workdir(action: Callable, options: ml_collections.ConfigDict, workdir_help: str) -> None:
  """Defines --workdir and --config (defaults: `options`), applies the CPU settings, then runs
  action(workdir, config). Flags are defined here, when a tool runs, never at import."""
  def define_flags():
    flags.DEFINE_string("workdir", None, workdir_help)
    config_flags.DEFINE_config_dict("config", options, "Options (configs/tools.py): --config.KEY=VALUE.")
    flags.mark_flags_as_required(["workdir"])

  def main(argv):
    no_arguments(argv)
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint it opens at INFO
    action(flags.FLAGS.workdir, flags.FLAGS.config)

  cpu_tuning.apply()
  run(main, options, define_flags)
