"""Running `run.py`'s entry point in tests and reading a user error back."""

from evf_jax import cli


def error_line(capsys, argv) -> str:
  """Runs `run.py ARGV`; asserts exit status 2 and exactly one `error: ...` line on stderr, and returns it."""
  code = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, err
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]
