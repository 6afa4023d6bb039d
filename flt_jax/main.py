r"""flt_jax entry point.

  python -m flt_jax.main --config=experiments/flt_12loop.py --workdir=/tmp/flt
  python -m flt_jax.main --config=experiments/flt_12loop.py:multihop --workdir=DIR \
      --config.model.loops=6
  python -m flt_jax.main --workdir=DIR --mode=eval --eval_loops=1,6,12,24
  python -m flt_jax.main --workdir=DIR --mode=eval --eval_tasks=core \
      --eval_bundle=eval_bundle --eval_loops=1,12
  python -m flt_jax.main --workdir=DIR --mode=eval \
      --eval_exit=latent_diff:0.01,latent_diff:0.03,kl:5e-4,argmax_stable:3
  python -m flt_jax.main --config=experiments/flt_12loop.py --print_config

Every setting is a config field (--config.<section>.<field>=value); the reference is
README.md ("Configuration") and the get_config() of each flt_jax/*/config.py.
"""

import os
import re
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from flt_jax import cli, run
from flt_jax.errors import ConfigError
from flt_jax.files import FileWriteError
from flt_jax.model import exit as exit_lib
from flt_jax.train.checkpoint import CheckpointError
from flt_jax.workdir_lock import WorkdirLockedError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file, optionally with a preset: file.py:preset; override fields "
  "with --config.<section>.<field>=value (reference: README.md, 'Configuration'). "
  "Optional in eval mode: the config saved in the checkpoint is used.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints and metrics (a local path or gs://...)."
)
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval"],
  "train (resumes from the workdir's latest checkpoint) or eval "
  "(restores it and runs --eval_tasks at --eval_loops).",
)
_EVAL_LOOPS = flags.DEFINE_list(
  "eval_loops", [], "Loop counts to evaluate at in eval mode (default: the trained K)."
)
_EVAL_STEP = flags.DEFINE_integer(
  "eval_step", None, "Checkpoint step to evaluate in eval mode (default: the latest)."
)
_EVAL_TASKS = flags.DEFINE_string(
  "eval_tasks",
  "sweep",
  "What eval mode runs at each --eval_loops: sweep (validation loss, bpb, answer "
  "accuracy, h_change), core (the CORE tasks of --eval_bundle), lm_eval:<task,...> "
  "(EleutherAI lm-eval tasks, listed last); e.g. sweep,core,lm_eval:hellaswag,arc_easy.",
)
_EVAL_BUNDLE = flags.DEFINE_string(
  "eval_bundle",
  "",
  "CORE eval bundle directory (core.yaml, eval_meta_data.csv, eval_data/), for --eval_tasks=core.",
)
_EVAL_LM_EVAL_INCLUDE = flags.DEFINE_string(
  "eval_lm_eval_include", "", "A directory of lm-eval task YAML files besides lm-eval's own."
)
_EVAL_MAX_EXAMPLES = flags.DEFINE_integer(
  "eval_max_examples",
  None,
  "CORE and lm-eval: evaluate at most this many examples per task (default: all).",
  lower_bound=1,
)
_EVAL_MAX_LEN = flags.DEFINE_integer(
  "eval_max_len",
  0,
  "CORE and lm-eval: tokens of context + continuation per example (contexts are "
  "left-truncated to fit); 0: the model's seq_len.",
  lower_bound=0,
)
_EVAL_EXIT = flags.DEFINE_string(
  "eval_exit",
  "",
  "Per-token exit in eval mode: criterion:threshold rules separated by commas "
  "(latent_diff:x, kl:x, argmax_stable:n; 0 never exits), each evaluated teacher-forced "
  "against the fixed --eval_loops (default 1..--eval_max_loops); writes the quality-versus-"
  "compute table exit_step<N>.json/csv/png. E.g. latent_diff:0.01,kl:5e-4,argmax_stable:3.",
)
_EVAL_MIN_LOOPS = flags.DEFINE_integer(
  "eval_min_loops", 1, "Per-token exit: loops every token runs before it may exit.", lower_bound=1
)
_EVAL_MAX_LOOPS = flags.DEFINE_integer(
  "eval_max_loops",
  0,
  "Per-token exit: loops a token runs at most (0: the trained K).",
  lower_bound=0,
)
_PRINT_CONFIG = flags.DEFINE_bool(
  "print_config", False, "Print the resolved config (every field, after overrides) and exit."
)


def parse_loops(values) -> list[int]:
  """--eval_loops as positive ints; SystemExit with a one-line message otherwise."""
  try:
    loops = [int(v) for v in values]
  except ValueError:
    loops = None
  if loops is None or any(k < 1 for k in loops) or any(not str(v).strip() for v in values):
    raise SystemExit(
      f"error: --eval_loops={','.join(values)} must be positive integers separated by "
      "commas, e.g. --eval_loops=1,2,4,12"
    )
  return loops


def parse_exit_rules() -> tuple:
  """--eval_exit with --eval_min_loops/--eval_max_loops as exit rules (none without
  --eval_exit); ValueError in one line for a bad rule or bound."""
  if not _EVAL_EXIT.value.strip():
    return ()
  return tuple(
    exit_lib.parse_exit_list(
      _EVAL_EXIT.value,
      flag="--eval_exit",
      min_loops=_EVAL_MIN_LOOPS.value,
      max_loops=_EVAL_MAX_LOOPS.value,
    )
  )


def _one_line(message: str) -> str:
  """A flag error in one line: ml_collections puts the traceback of an error raised
  while loading the config file (e.g. an unknown preset) into the message; keep its
  first line and the exception at the end."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  if not lines:
    return message
  if any(line.startswith("Traceback") for line in lines):
    return f"{lines[0].rstrip(':')}: {lines[-1]}"
  if any("Failed loading config file" in line for line in lines):  # the loader's OSError
    tried = [line for line in lines if "No such file" in line or "Errno" in line]
    return f"cannot load the config file: {tried[-1] if tried else lines[-1]}"
  return "; ".join(lines)


def _unknown_key(argv, error: Exception) -> str:
  """One line for an override of a field that does not exist: which override, which
  section lacks the field, and ml_collections' suggestion when it has one (its KeyError,
  or an AttributeError wrapping one, holds the quoted key, then 'Did you mean "..."')."""
  inner = error.args[0] if error.args else ""
  if isinstance(inner, KeyError):
    inner = inner.args[0] if inner.args else ""
  text = str(inner)
  key = re.match(r"'?([^'\n]*)", text).group(1)
  guess = re.search(r'Did you mean "([^"]+)"', text)
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  for arg in overrides:
    path = arg.removeprefix("--").split("=", 1)[0].split(".")
    if key in path[1:]:
      parent = ".".join(path[: path.index(key, 1)])
      hint = f" (did you mean {parent}.{guess.group(1)}?)" if guess else ""
      return (
        f"unknown config key {arg.split('=', 1)[0]}: {parent} has no field {key!r}{hint}. "
        "Fix: name an existing field; --print_config lists them all"
      )
  names = [a.split("=", 1)[0] for a in overrides]
  return f"unknown config key {key!r} in {', '.join(names)}. Fix: --print_config lists every field"


def parse_flags(argv):
  """absl's parser, with a clear message for an override of a key that does not exist."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f"error: {_one_line(str(e))} (--help lists the flags)") from None
  except OSError as e:  # ml_collections: the config file cannot be loaded
    raise SystemExit(f"error: --config: {_one_line(str(e))}") from None
  except (AttributeError, KeyError) as e:
    raise SystemExit(f"error: {_unknown_key(argv, e)}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is not None:
    try:  # ml_collections defers a config file it could not open to the first access
      config.to_dict  # noqa: B018
    except OSError as e:
      raise SystemExit(f"error: --config: {_one_line(str(e))}") from None
  try:
    if _PRINT_CONFIG.value:
      if config is None:
        raise SystemExit("error: --print_config needs --config=FILE[:preset]")
      print(run.resolve_config(config))
      return
    if not _WORKDIR.value:
      raise SystemExit("error: --workdir is required (a local directory or gs://BUCKET/RUN)")
    if _MODE.value == "train":
      if config is None:
        raise SystemExit(
          "error: --mode=train needs --config=FILE[:preset], e.g. "
          "--config=experiments/flt_12loop.py"
        )
      run.train_and_evaluate(config, _WORKDIR.value)
    else:
      loops = parse_loops(_EVAL_LOOPS.value)
      options = run.TaskOptions(
        bundle=_EVAL_BUNDLE.value,
        lm_eval_include=_EVAL_LM_EVAL_INCLUDE.value,
        max_examples=_EVAL_MAX_EXAMPLES.value,
        max_len=_EVAL_MAX_LEN.value,
        exit_rules=parse_exit_rules(),
      )
      tasks = run.EvalTasks.parse(_EVAL_TASKS.value)
      run.evaluate_tasks(config, _WORKDIR.value, tasks, loops, _EVAL_STEP.value, options)
  except (
    ConfigError,
    ValueError,
    CheckpointError,
    run.NonFiniteError,
    WorkdirLockedError,
    FileWriteError,
  ) as e:
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    # Ctrl-C outside the train loop (which saves and stops on its own): while starting,
    # compiling or evaluating. Nothing is half-written: files are replaced whole.
    # Exits without the interpreter's teardown, which can crash in XLA's threads when
    # interrupted mid-compile; there is nothing left to flush but the console.
    print("\ninterrupted (Ctrl-C): stopped; the checkpoints already saved are intact", flush=True)
    sys.stderr.flush()
    os._exit(130)


def _closed_event_loop(error) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _ignore_closed_event_loop_errors() -> None:
  """Orbax's restore reads arrays through tensorstore callbacks onto an asyncio loop; when
  a read fails (a deleted or truncated array file), the one-line error is reported and
  the loop closed, but reads still in flight call back into the closed loop, each with a
  traceback of that RuntimeError (through whichever hook the calling thread reaches).
  They say nothing the error did not."""
  excepthook, unraisable, thread_hook = sys.excepthook, sys.unraisablehook, threading.excepthook
  sys.excepthook = lambda kind, value, tb: (
    None if _closed_event_loop(value) else excepthook(kind, value, tb)
  )
  sys.unraisablehook = lambda a: None if _closed_event_loop(a.exc_value) else unraisable(a)
  threading.excepthook = lambda a: None if _closed_event_loop(a.exc_value) else thread_hook(a)


if __name__ == "__main__":
  _ignore_closed_event_loop_errors()
  cli.run(main, flags_parser=parse_flags)
