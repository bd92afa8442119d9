"""Repository-wide rules no linter rule covers: 2-space indentation, and nothing cited from outside the repo.

ruff (`make test` runs `ruff check .`, configured in .ruff.toml) checks the rest; its lint rules for indentation
only know multiples of 4, so the width is checked here from the tokenizer's own INDENT tokens.
"""
import io
import os
import re
import subprocess
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracked(*patterns) -> list:
  out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
  if out.returncode:  # not a git checkout (an sdist): walk the tree instead
    return [os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(ROOT)
            if ".venv" not in d for f in files if any(f.endswith(p.lstrip("*")) for p in patterns)]
  return [f for f in out.stdout.split() if os.path.exists(os.path.join(ROOT, f))]


def indent_steps(source: str) -> set:
  """The widths by which blocks indent (INDENT tokens minus their enclosing level)."""
  steps, stack = set(), [0]
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.INDENT:
      steps.add(len(tok.string) - stack[-1])
      stack.append(len(tok.string))
    elif tok.type == tokenize.DEDENT:
      stack.pop()
  return steps


def test_indent_steps_sees_four_space_blocks():
  assert indent_steps("def f(x):\n    if x:\n        return 1\n") == {4}
  assert indent_steps("def f(x):\n  if x:\n    return (1,\n            2)\n") == {2}


@pytest.mark.parametrize("path", tracked("*.py"))
def test_python_files_indent_by_two_spaces(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    steps = indent_steps(f.read())
  assert steps <= {2}, f"{path}: blocks indent by {sorted(steps)} spaces; the project uses 2"


def test_nothing_cites_a_file_outside_the_repository():
  outside = re.compile(r"ALGORITHMS[.]md|PERF[-]NOTES|[.][.]/shared")  # written so as not to match itself
  hits = []
  for path in tracked("*.py", "*.md", "*.cfg", "*.toml", "Makefile"):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      hits += [f"{path}:{i}" for i, line in enumerate(f, 1) if outside.search(line)]
  assert not hits, f"references to files outside the repository: {hits}"
