"""User-facing errors: the command line prints these as one line and exits non-zero, no traceback."""


class UserError(Exception):
  """A problem with what the user gave us (a file, a directory, an argument), not a bug."""
