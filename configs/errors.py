"""The error a user can fix: a bad config key, data file, path or checkpoint.

Any layer raises it (configs is the one module every layer may import). Entry points print it as
one line, plus its hint, and exit with code 2, with no traceback unless asked for one.
"""
import difflib


class UserError(ValueError):
  """A problem in the user's input, named where it is (the config key, file:line, path).

  `hint`: what to do about it, printed on a second line ("" = none). A ValueError, so code that
  catches bad values keeps catching it."""

  def __init__(self, message: str, hint: str = ""):
    super().__init__(message)
    self.hint = hint


def _initials(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def closest(name: str, choices) -> str:
  """The choice spelled most like `name`, else one that is its initials (learning_rate -> lr) or one of
  its words (lr_typo -> lr), or that contains it or is contained in it ("" if none): the "did you
  mean" of an error."""
  choices = [str(c) for c in choices]
  found = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
  if found:
    return found[0]
  for c in choices:
    if c in (_initials(name), *name.split("_")) or _initials(c) == name or (
        min(len(c), len(name)) > 2 and (c in name or name in c)):
      return c
  return ""


def unknown(what: str, name: str, choices, prefix: str = "", noun: str = "key") -> UserError:
  """`WHAT: no such NOUN (did you mean PREFIXclosest?)`, with the valid choices as its hint."""
  near = closest(name, choices)
  guess = f" (did you mean {prefix}{near}?)" if near else ""
  return UserError(f"{what}: no such {noun}{guess}", hint=f"known: {', '.join(sorted(map(str, choices)))}")
