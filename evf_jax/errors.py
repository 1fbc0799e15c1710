"""User-facing errors: the command line prints these as one line and exits non-zero, no traceback."""


class UserError(Exception):
  """A problem with what the user gave us (a file, a directory, an argument), not a bug."""


def first_line(e: BaseException, empty: str = "") -> str:
  """The first line of `e`'s message, for a one-line error that quotes another library's: their messages often
  go on with tracebacks, hints or links. A blank message gives `empty`, else `e`'s type name."""
  text = str(e).strip()
  return text.splitlines()[0] if text else (empty or type(e).__name__)


def innermost(e: BaseException) -> BaseException:
  """The exception at the bottom of `e`'s chain of explicit causes (`raise ... from`): libraries such as orbax
  wrap the one that says what went wrong ("byte range ... is not valid for value of size ...") in one that only
  says where. Implicit contexts are not followed: they may be errors the library handled."""
  seen = [e]
  while (nxt := seen[-1].__cause__) is not None and nxt not in seen:
    seen.append(nxt)
  return seen[-1]
