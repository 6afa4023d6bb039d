"""Bad input to the commands is one line naming the problem and the fix, written before
anything else; asking for help is not an error."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flt_jax import cli, export, interop, main, presets, run, sample, study
from flt_jax.errors import ConfigError
from flt_jax.eval import sweep_report
from flt_jax.eval.generate import Generator
from flt_jax.model import config as model_config
from flt_jax.train import config as train_config
from flt_jax.train import optimizer
from tests.helpers.runs import tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def _command(name, *args):
  return subprocess.run(
    [sys.executable, "-m", f"flt_jax.{name}", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("name", ["main", "sample", "export", "study", "aot"])
def test_help_prints_the_flags_and_exits_zero(name):
  proc = _command(name, "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--" in proc.stdout and "Try --helpfull" in proc.stdout


def test_a_missing_flag_is_still_an_error():
  assert _command("export", "--workdir=/nonexistent").returncode == 1


@pytest.mark.parametrize(
  "argv, asks",
  [
    (["p", "--help"], True),
    (["p", "-?"], True),
    (["p", "--helpfull"], True),
    (["p", "--help=false"], False),
    (["p", "--", "--help"], False),
    (["p", "--config=help"], False),
  ],
)
def test_asks_for_help(argv, asks):
  assert cli.asks_for_help(argv) is asks


def test_help_exits_zero_only_for_help():
  def parser(argv):
    raise SystemExit(1)

  with pytest.raises(SystemExit) as e:
    cli.help_exits_zero(parser)(["p", "--help"])
  assert e.value.code == 0
  with pytest.raises(SystemExit) as e:
    cli.help_exits_zero(parser)(["p", "--nope"])
  assert e.value.code == 1


# ----------------------------------------------------------------------------- config


def _override_error(path):
  """The exception ml_collections raises for --config.<path>=...: the locked config's
  attribute lookup of each part."""
  config = presets.make("FLT", 12, "cpu")
  config.lock()
  node = config
  try:
    for name in path.split("."):
      node = getattr(node, name)
  except (AttributeError, KeyError) as e:
    return e
  raise AssertionError(f"{path} exists")


@pytest.mark.parametrize(
  "path, expected",
  [
    (
      "model.loop",
      "unknown config key --config.model.loop: config.model has no field 'loop' "
      "(did you mean config.model.loops?)",
    ),
    (
      "modell.loops",
      "unknown config key --config.modell.loops: config has no field 'modell' "
      "(did you mean config.model?)",
    ),
    (
      "data.multihop.hopz",
      "unknown config key --config.data.multihop.hopz: config.data.multihop has no field 'hopz'.",
    ),
  ],
)
def test_an_unknown_key_is_named_with_its_suggestion(path, expected):
  argv = [
    "main",
    "--config=experiments/flt_12loop.py",
    "--config.train.steps=3",
    f"--config.{path}=1",
  ]
  message = main._unknown_key(argv, _override_error(path))
  assert message.startswith(expected) and "Fix:" in message and "\n" not in message


def test_an_unknown_key_on_the_command_line_is_one_line():
  proc = _command("main", "--config=experiments/flt_12loop.py", "--config.model.loop=3")
  assert proc.returncode == 1
  # Its last line, and its only error line (an installed CUDA plugin may log before it).
  errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert (
    errors
    == [proc.stderr.strip().splitlines()[-1]]
    == [
      "error: unknown config key --config.model.loop: config.model has no field 'loop' (did "
      "you mean config.model.loops?). Fix: name an existing field; --print_config lists them all"
    ]
  )


def _validated(**train):
  c = presets.make("FLT", 12, "cpu")
  c.train.update(train)
  train_config.validate(c)


def test_a_step_count_beyond_the_step_counters_is_refused():
  _validated(steps=train_config.MAX_STEPS)
  with pytest.raises(
    ConfigError, match=r"config.train.steps=1000000000000 is invalid: must be at most 2,147,483,647"
  ):
    _validated(steps=10**12)


def test_the_schedule_at_the_largest_horizon_is_finite():
  total = train_config.MAX_STEPS
  steps = jnp.asarray([0, total // 2, total - 1, total], jnp.int32)
  got = jax.jit(lambda s: optimizer.lr_multiplier(s, total, 10, 0.2))(steps)
  np.testing.assert_allclose(got, [0.1, 1.0, 0.0, 0.0], atol=1e-6)
  assert optimizer.lr_multiplier(total // 2, total) == 1.0


def test_a_derived_horizon_beyond_the_step_counters_is_refused():
  train = ml_collections.ConfigDict(dict(steps=-1, tokens_per_param=1e12))
  with pytest.raises(
    ConfigError, match="config.train.tokens_per_param=1000000000000.0 is invalid: its horizon of"
  ):
    optimizer.resolve_total_steps(train, num_params=1_000_000, tokens_per_step=1024)
  train.tokens_per_param = 20.0
  assert optimizer.resolve_total_steps(train, 1_000_000, 1024) == 19532


@pytest.mark.parametrize(
  "total, suggested", [(1000, "1024 or 2048"), (3000, "2048 or 3072"), (5000, "4096 or 5120")]
)
def test_a_batch_that_is_no_multiple_gets_two_distinct_suggestions(total, suggested):
  with pytest.raises(ConfigError, match=f"a multiple of 1024 \\(e.g. {suggested}\\)"):
    _validated(total_batch_tokens=total)  # the cpu preset: 8 sequences of 128 tokens


def test_nearest_multiples():
  assert train_config.nearest_multiples(1, 1024) == (1024, 2048)
  assert train_config.nearest_multiples(1025, 1024) == (1024, 2048)
  assert train_config.nearest_multiples(4095, 1024) == (3072, 4096)


# ----------------------------------------------------------------------------- study


@pytest.mark.parametrize(
  "experiments, overrides, message",
  [
    (["flt_12loopp"], [], "no experiment 'flt_12loopp' in experiments (did you mean flt_12loop?)"),
    (["__init__"], [], "no experiment '__init__'"),
    ([], [], "--experiments='' names no experiment"),
    (["flt_12loop", ""], [], "names no experiment"),
    (
      ["flt_12loop"],
      ["model.d_modell=64"],
      "--set=model.d_modell=64: config.model has no field 'd_modell' (did you mean model.d_model?)",
    ),
    (["flt_12loop"], ["modell.d_model=64"], "config has no field 'modell' (did you mean model?)"),
    (["flt_12loop"], ["model.d_model=abc"], "model.d_model is int (128), and 'abc' is not one"),
    (["flt_12loop"], ["model.d_model=64.5"], "and '64.5' is not one (not a whole number)"),
    (["flt_12loop"], ["model.loops=0"], "config.model.loops=0 is invalid"),
    (["lt_12loop", "flt_12loop"], ["model.d_model"], "is not section.field=value"),
  ],
)
def test_study_input_errors_come_before_the_output_directory(
  tmp_path, experiments, overrides, message
):
  out = tmp_path / "study"
  with pytest.raises(ValueError) as e:
    study.run_study(experiments, out=out, steps=2, log_every=1, overrides=overrides)
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not out.exists()


def test_study_known_experiments_are_the_experiment_files():
  known = study.known_experiments(str(REPO / "experiments"))
  assert "flt_12loop" in known and "lt_12loop" in known
  assert not [name for name in known if name.startswith("_")]


def test_study_overrides_keep_their_field_types():
  config = presets.make("FLT", 12, "cpu")
  study.apply_override(config, "model.d_model=64")
  study.apply_override(config, "train.steps=1e3")
  study.apply_override(config, "optim.matrix_lr=0.01")
  study.apply_override(config, "model.unroll_layers=false")
  study.apply_override(config, "data.source=multihop")
  assert (config.model.d_model, config.optim.matrix_lr, config.train.steps) == (64, 0.01, 1000)
  assert isinstance(config.train.steps, int)
  assert config.model.unroll_layers is False and config.data.source == "multihop"


def test_the_study_command_prints_no_log_noise(tmp_path):
  sets = [
    "model.loops=1",
    "model.n_layer=1",
    "model.d_model=16",
    "model.n_head=1",
    "model.n_kv_head=1",
    "model.seq_len=16",
    "train.micro_batch_size=2",
    "train.total_batch_tokens=32",
    "train.eval_steps=1",
    "mesh.cpu_devices=0",
    "metrics.tensorboard=false",
  ]
  proc = _command(
    "study",
    "--experiments=flt_12loop",
    "--steps=1",
    "--log_every=1",
    f"--out={tmp_path}",
    *(f"--set={s}" for s in sets),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # No absl/Orbax log lines from Python ("I1202 12:00:00.1 123 file.py:45] ..."; it was
  # 79 lines), no libtpu block. (An installed CUDA plugin's libraries log from C++ while
  # jax is imported, before any flt_jax code runs: not counted here.)
  assert not re.search(r"^[IWE]\d{4} .*\.py:\d+\]", proc.stderr, re.M), proc.stderr[-3000:]
  assert "host bounds" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr
  assert "| flt_12loop |" in proc.stdout


# ----------------------------------------------------------------------------- sample


def test_sample_refuses_zero_loops_before_any_work(tmp_path):
  with pytest.raises(
    ValueError, match=r"--loops=0 is invalid: .* omit --loops to run at the trained K"
  ):
    sample.generate_text(str(tmp_path / "no_such_run"), "x", loops=0)


def _generator(seq_len=16):
  c = model_config.get_config()
  c.update(vocab_size=64, n_layer=1, d_model=16, n_head=1, n_kv_head=1, loops=2, seq_len=seq_len)
  return Generator(model_config.ModelConfig.from_config(c), loops=2)


def test_a_prompt_longer_than_the_rotary_table_says_by_how_much():
  generator = _generator()  # seq_len 16: 160 positions
  with pytest.raises(ValueError) as e:
    generator.check_length(5000, 200)
  assert str(e.value).startswith(
    "the prompt is 5000 tokens, 4840 more than the 160 positions of the model's rotary table"
  )
  assert "shorten it by at least 5039 tokens to generate --max_new_tokens=200" in str(e.value)
  with pytest.raises(ValueError, match="lower --max_new_tokens to at most 11"):
    generator.check_length(150, 200)
  generator.check_length(160, 1)  # the prompt fills the table: one new token still fits


# ----------------------------------------------------------------------------- export


def test_load_workdir_gives_what_the_npz_read_back_needs(tmp_path):
  workdir = tmp_path / "run"
  c = tiny_run_config()
  c.train.update(dict(steps=2, eval_every=0))
  run.train_and_evaluate(c, str(workdir))
  out = tmp_path / "model.npz"
  export.export_npz(str(workdir), str(out))
  model_cfg, model, params = export.load_workdir(str(workdir))
  assert (model_cfg.d_model, model_cfg.loops, model_cfg.vocab_size) == (32, 2, 10)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
  loaded = interop.load_reference_npz(str(out), model_cfg)
  tokens_BxT = np.arange(2 * model_cfg.seq_len, dtype=np.int32).reshape(2, -1) % 10
  np.testing.assert_array_equal(
    model.apply({"params": loaded}, tokens_BxT), model.apply({"params": params}, tokens_BxT)
  )


# ----------------------------------------------------------------------------- h_change


def test_a_sweep_row_says_why_h_change_is_missing_at_one_loop():
  row = sweep_report.describe({"loss": 1.5, "tokens": 10.0, "h_change": float("nan")})
  assert row == "loss 1.5000 | h_change n/a (one loop: no earlier h to compare with)"
  assert sweep_report.describe({"h_change": 0.25}) == "h_change 0.2500"
  assert "none at K'=1" in sweep_report.METRIC_TITLES["h_change"]
