"""The import layers (pyproject.toml [tool.importlinter]) hold, and the linter does catch
an upward import or an import cycle, function-local ones included."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = (
  "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
  # import-linter puts its working directory first on sys.path, so it analyses the
  # flt_jax package found in `root`.
  return subprocess.run(
    [sys.executable, "-c", LINT, "--no-cache"],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_the_package_keeps_its_layers():
  proc = lint_imports(REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "Contracts: 2 kept, 0 broken." in proc.stdout


@pytest.mark.parametrize(
  "module,source,message",
  [
    (
      "model/bad.py",
      "from flt_jax.train import step\n",
      "flt_jax.model is not allowed to import flt_jax.train",
    ),
    (
      "eval/bad.py",
      "def helper():\n  from flt_jax.train import optimizer\n",
      "flt_jax.eval is not allowed to import flt_jax.train",
    ),
    (
      "data/bad.py",
      "from flt_jax import run\n",
      "flt_jax.data is not allowed to import flt_jax.run",
    ),
    (
      "data/sources.py",
      "\n\ndef helper():\n  from flt_jax.data import pipeline\n",
      "No cycles are allowed in flt_jax.data",
    ),
  ],
)
def test_an_upward_import_or_a_cycle_fails(tmp_path, module, source, message):
  shutil.copytree(
    REPO / "flt_jax", tmp_path / "flt_jax", ignore=shutil.ignore_patterns("__pycache__")
  )
  shutil.copy(REPO / "pyproject.toml", tmp_path)
  path = tmp_path / "flt_jax" / module
  with open(path, "a") as f:
    f.write(source)
  proc = lint_imports(tmp_path)
  assert proc.returncode != 0
  assert message in proc.stdout, proc.stdout[-3000:]
