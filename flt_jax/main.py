r"""flt_jax entry point.

  python -m flt_jax.main --config=experiments/flt_12loop.py --workdir=/tmp/flt
  python -m flt_jax.main --config=experiments/flt_12loop.py:multihop --workdir=DIR \
      --config.model.loops=6
  python -m flt_jax.main --config=experiments/flt_12loop.py --workdir=DIR \
      --mode=eval --eval_loops=1,6,12,24
"""

from absl import app, flags, logging
from ml_collections import config_flags

from flt_jax import run
from flt_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file, optionally with a preset: file.py:preset.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval"],
  "train (resumes from the workdir's latest checkpoint) or eval "
  "(restores it and evaluates at --eval_loops).",
)
_EVAL_LOOPS = flags.DEFINE_list(
  "eval_loops", [], "Loop counts to evaluate at in eval mode (default: config.model.loops)."
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's parser, with a clear message for an override of a key that does not exist."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f"error: {e}\nPass --helpfull to list the flags.") from None
  except (AttributeError, KeyError) as e:
    bad = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    raise SystemExit(
      f"error: unknown config key in {bad} ({e}); every override must "
      "name an existing field, see experiments/base.py and the "
      "get_config() of flt_jax/{model,data,train}/config.py"
    ) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    if _MODE.value == "train":
      run.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      run.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, [int(k) for k in _EVAL_LOOPS.value])
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
