"""The command modules (python -m flt_jax.<name>) import side by side in one process, and
each still defines its own flags when it runs as a program."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("main", "aot", "sample", "study", "export")


def test_every_command_module_imports_beside_the_others():
  code = "import importlib\nfor name in %r:\n  importlib.import_module('flt_jax.' + name)\n"
  proc = subprocess.run(
    [sys.executable, "-c", code % (COMMANDS,)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
  "name, flag", [("aot", "--topology"), ("sample", "--prompt"), ("study", "--experiments")]
)
def test_a_command_run_as_a_program_has_its_flags(name, flag):
  proc = subprocess.run(
    [sys.executable, "-m", f"flt_jax.{name}", "--helpshort"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  # absl prints the module's flags ("  --name: help") and exits 1 after --helpshort.
  assert f"  {flag}:" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
