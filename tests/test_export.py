"""python -m flt_jax.export: a checkpoint as the reference's state dict, read back."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from flt_jax import export, interop, run
from tests.helpers.runs import REPO, tiny_run_config


def test_export_then_import_gives_the_same_params_and_logits(tmp_path):
  workdir = tmp_path / "run"
  c = tiny_run_config()
  c.train.update(dict(steps=3, eval_every=0))
  run.train_and_evaluate(c, str(workdir))
  out = tmp_path / "export" / "model.npz"
  proc = subprocess.run(
    [sys.executable, "-m", "flt_jax.export", f"--workdir={workdir}", f"--out={out}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"wrote {out}: step 3 of {workdir}" in proc.stdout
  run_setup, params, step = run.restore_params(str(workdir))
  cfg = run_setup.model_cfg
  with np.load(out) as f:
    names = sorted(f.files)
  assert names == sorted(interop.expected_shapes(cfg))
  loaded = interop.load_reference_npz(str(out), cfg)
  params = jax.device_get(params)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b, np.float32))
  tokens_BxT = (np.arange(2 * cfg.seq_len, dtype=np.int32).reshape(2, -1) * 7) % cfg.vocab_size
  logits = run_setup.model.apply({"params": loaded}, tokens_BxT)
  np.testing.assert_array_equal(logits, run_setup.model.apply({"params": params}, tokens_BxT))
  with pytest.raises(ValueError, match="no checkpoints in"):
    export.export_npz(str(tmp_path / "none"), str(tmp_path / "none.npz"))
  assert not (tmp_path / "none").exists() and not (tmp_path / "none.npz").exists()
