"""The error a user can fix: a bad config key, data file, path or checkpoint.

Any layer raises it (configs is the one module every layer may import). Entry points print it as
one line, plus its hint, and exit with code 2, with no traceback unless asked for one.
"""


class UserError(ValueError):
  """A problem in the user's input, named where it is (the config key, file:line, path).

  `hint`: what to do about it, printed on a second line ("" = none). A ValueError, so code that
  catches bad values keeps catching it."""

  def __init__(self, message: str, hint: str = ""):
    super().__init__(message)
    self.hint = hint
