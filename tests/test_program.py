"""run/program.py: one builder for the step that trains and the step flt_jax.aot compiles."""

import re

import jax

from flt_jax import aot, run
from flt_jax.train import step as step_lib
from tests.helpers.runs import tiny_run_config

_SOURCE_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def _hlo(compiled) -> str:
  """Compiled HLO without what names the Python source it was traced from (the calling
  file differs between the two paths): the module name, op metadata, stack tables."""
  blocks = compiled.as_text().split("\n\n")
  text = "\n\n".join(b for b in blocks if not b.lstrip().startswith(_SOURCE_TABLES))
  text = re.sub(r"^HloModule \S+", "HloModule m", text, flags=re.MULTILINE)
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  return re.sub(r",? ?stack_frame_id=\d+", "", text)


def _training_step_hlo(config, workdir) -> str:
  """The HLO of the step the train loop runs, compiled on the real state and batch."""
  run_setup = run.setup(config, str(workdir), training=True)
  state = run_setup.init_state()
  batch = run_setup.global_batch(
    next(iter(run_setup.train_pipeline)),
    step_lib.batch_keys(run_setup.model_cfg),
    run_setup.global_batch_size,
  )
  return _hlo(run_setup.train_step(diagnostics=False).lower(state, batch).compile())


def _aot_step_hlo(config, vocab_size: int) -> str:
  program = run.build_program(config, vocab_size, jax.devices())
  report, compiled = aot.compile_train_step(program, hbm_bytes=1 << 40, topology="cpu")
  assert report.num_devices == jax.device_count() and report.fits
  return _hlo(compiled)


def test_aot_compiles_the_step_that_trains(tmp_path):
  c = tiny_run_config()
  c.train.max_consecutive_nonfinite = 3  # a setting the old AOT builder dropped
  vocab = run.setup(c, str(tmp_path), training=False).model_cfg.vocab_size
  trained = _training_step_hlo(c, tmp_path / "a")
  assert _aot_step_hlo(c, vocab) == trained
  # The comparison sees a difference in the step: another stop rule is another program.
  c.train.max_consecutive_nonfinite = 4
  assert _aot_step_hlo(c, vocab) != trained
