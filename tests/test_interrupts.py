"""Ctrl-C: one line at any moment, and a second Ctrl-C during the save-and-stop exits at
once."""

import subprocess
import sys
from pathlib import Path

from tests.helpers.runs import main_command

REPO = Path(__file__).resolve().parents[1]


def test_ctrl_c_while_starting_is_one_line(tmp_path):
  """A real SIGINT while the run sets itself up (before the loop's own handler)."""
  command = main_command(tmp_path / "run")
  code = (
    "import os, signal, sys, time\n"
    "from absl import app\n"
    "from flt_jax import main\n"
    "from flt_jax.run import loop\n"
    # A terminal's Ctrl-C meets Python's default handler; a job a shell starts in the
    # background (as CI may run this suite) inherits SIGINT ignored.
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "def setup(*args, **kwargs):\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  time.sleep(30)\n"
    "loop.setup = setup\n"
    f"sys.argv = {['flt_jax.main', *command[3:]]!r}\n"
    "app.run(main.main, flags_parser=main.parse_flags)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 130, out
  assert "Traceback" not in out.stdout + out.stderr, out
  lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
  assert lines == ["interrupted (Ctrl-C): stopped; the checkpoints already saved are intact"]
  assert not (tmp_path / "run").exists()


def test_a_second_ctrl_c_exits_at_once():
  code = (
    "import os, signal, time\n"
    "from flt_jax.train.checkpoint import PreemptionHandler\n"
    "with PreemptionHandler(lambda step: False, (signal.SIGTERM, signal.SIGINT)) as p:\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  time.sleep(0.1)\n"
    "  assert p.should_stop(1), 'the first Ctrl-C sets the flag'\n"
    "  print('first handled', flush=True)\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  time.sleep(5)\n"
    "  print('still running')\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 130, out
  assert "first handled" in out.stdout and "still running" not in out.stdout
  assert "second Ctrl-C: exiting now" in out.stderr


def test_a_deleted_array_file_is_one_line_with_no_tracebacks(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.run(
    main_command(workdir, "--config.train.steps=3", "--config.train.eval_every=0"),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert first.returncode == 0, first.stderr
  (largest,) = sorted(
    (workdir / "checkpoints" / "3" / "state").glob("d/*"), key=lambda p: p.stat().st_size
  )[-1:]
  largest.unlink()
  out = subprocess.run(
    main_command(workdir, "--config.train.steps=5", "--config.train.eval_every=0"),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 1
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Could not restore the checkpoint" in errors[0]
