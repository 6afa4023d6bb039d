"""Marks for tests that need an optional extra, something requirements.txt does not
install: they skip, saying what to install, where it is absent, and carry the
`needs_extra` marker so that CI (.ci/run) runs exactly them after installing the extras."""

from __future__ import annotations

import importlib.util

import pytest


def installed(module: str) -> bool:
  """Whether `module` (dotted names too: its parent package may be absent) is importable."""
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a dotted name whose parent package is not installed
    return False


def needs(module: str, requirements: str, what: str) -> list[pytest.MarkDecorator]:
  """Marks for a test (or a module's `pytestmark`) that needs `module` for `what`;
  `requirements` is the file that installs it."""
  missing = not installed(module)
  reason = f"{module} is not installed: {what} needs it (pip install -r {requirements})"
  return [pytest.mark.needs_extra, pytest.mark.skipif(missing, reason=reason)]
