"""What every command (python -m flt_jax.<name>) shares on its command line.

absl ends `--help` (and `--helpshort`, `--helpfull`, `--helpxml`, `-?`) with exit status
1, as if asking for help were an error; `run` runs a command's `main` with absl, except
that asking for help exits 0 after the help text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import app

HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def asks_for_help(argv: Sequence[str]) -> bool:
  """Whether argv (program name first) holds one of absl's help flags, set to true,
  before a `--` that ends the flags."""
  for arg in argv[1:]:
    if arg == "--":
      return False
    if not arg.startswith("-"):
      continue
    name, _, value = arg.lstrip("-").partition("=")
    if name in HELP_FLAGS and value.lower() not in ("false", "0", "no"):
      return True
  return False


def help_exits_zero(parser: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str]]:
  """`parser` (absl's or a command's own flags parser), except that the exit after the
  help text has status 0."""

  def parse(argv):
    try:
      return parser(argv)
    except SystemExit as e:
      if e.code == 1 and asks_for_help(argv):
        raise SystemExit(0) from None
      raise

  return parse


def run(main: Callable[[list[str]], object], flags_parser=app.parse_flags_with_usage) -> None:
  """absl's app.run(main) with `flags_parser`, --help exiting 0."""
  app.run(main, flags_parser=help_exits_zero(flags_parser))
