r"""Export a checkpoint's params as the official implementation's state dict (.npz).

  python -m flt_jax.export --workdir=DIR --out=model.npz            # the latest step
  python -m flt_jax.export --workdir=DIR --step=300 --out=model.npz

Restores the params of a checkpoint of DIR with the config saved in it (as
`--mode=eval` does) and writes them with `interop.save_reference_npz`: the reference's
names and torch layouts (`transformer.wte.weight`, `transformer.h.{l}.attn.c_q.weight`,
..., Linear weights [out, in]), float32. In PyTorch:

  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load("model.npz").items()})

`interop.load_reference_npz(path, model_cfg)` reads it back into flt_jax params, with
the model config from `load_workdir(DIR)`.
"""

from __future__ import annotations

import io

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

from flt_jax import cli, files, interop, run
from flt_jax.errors import ConfigError
from flt_jax.model.config import ModelConfig
from flt_jax.train.checkpoint import CheckpointError


def _on_host(params):
  """The params as numpy arrays, whole on every host."""
  if jax.process_count() > 1:  # every host holds part of each array: gather them
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def load_workdir(workdir: str, step: int | None = None) -> tuple[ModelConfig, nn.Module, dict]:
  """(model_cfg, model, params) of `workdir`'s checkpoint `step` (default: the latest),
  restored with the config saved in it, the params as numpy arrays: what
  `model.apply({"params": params}, tokens_BxT)` and `interop.load_reference_npz(path,
  model_cfg)` need. Raises ValueError or CheckpointError with a one-line message."""
  run_setup, params, _ = run.restore_params(workdir, None, step)
  return run_setup.model_cfg, run_setup.model, _on_host(params)


def export_npz(workdir: str, out: str, step: int | None = None) -> dict:
  """Writes the params of `workdir`'s checkpoint `step` (default: the latest) to `out` as
  the reference's state dict. Returns {'step', 'path', 'model_cfg', 'names'}."""
  files.check_writable_file(out)  # a bad --out is named before the restore's work
  run_setup, params, step = run.restore_params(workdir, None, step)
  params = _on_host(params)
  state_dict = interop.to_reference(params, run_setup.model_cfg)
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, **state_dict)
    # Whole or not at all: a kill or a full disk mid-write leaves the previous file.
    files.write_atomic(out, buffer.getvalue())
  return {"step": step, "path": out, "model_cfg": run_setup.model_cfg, "names": sorted(state_dict)}


def define_flags() -> None:
  """Defines the command's flags. Called only when the module runs as a program: absl
  flags are global, so the commands' functions can be imported side by side."""
  flags.DEFINE_string("workdir", None, "The run directory whose checkpoint to export.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("out", None, "The .npz file to write.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if not flags.FLAGS.workdir or not flags.FLAGS.out:
    raise SystemExit("error: --workdir and --out are required, e.g. --workdir=DIR --out=model.npz")
  try:
    result = export_npz(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step)
  except (ConfigError, ValueError, CheckpointError, files.FileWriteError) as e:
    raise SystemExit(f"error: {e}") from None
  cfg = result["model_cfg"]
  if jax.process_index() == 0:
    print(
      f"wrote {result['path']}: step {result['step']} of {flags.FLAGS.workdir} as the reference "
      f"state dict ({len(result['names'])} arrays; {cfg.variant} K={cfg.loops} "
      f"L={cfg.n_layer} d={cfg.d_model} vocab={cfg.vocab_size} padded to "
      f"{cfg.padded_vocab_size})"
    )


if __name__ == "__main__":
  define_flags()
  cli.run(main)
