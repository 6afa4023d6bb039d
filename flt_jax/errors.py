"""The one error type and message format for bad configuration values.

Every section's validation raises `ConfigError` through `config_error`, so a user always
reads the same shape: which field, the value given, what is required, and how to fix it.
`ConfigError` is a `ValueError`, and the entry point prints it as one line.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A configuration value (or a combination of them) that cannot run."""


def config_error(path: str, value, requirement: str, fix: str = "") -> ConfigError:
  """`config.<path>=<value> is invalid: <requirement>. Fix: <fix>.` as a ConfigError
  (`config=<value> ...` for the root, path "")."""
  name = f"config.{path}" if path else "config"
  msg = f"{name}={value!r} is invalid: {requirement}."
  if fix:
    msg += f" Fix: {fix}."
  return ConfigError(msg)
