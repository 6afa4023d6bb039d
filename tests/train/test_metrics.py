"""Tests for flt_jax.train.metrics."""

import glob
import json
import math
import struct

import numpy as np
import pytest
from etils import epath
from tensorboardX.proto import event_pb2

from flt_jax.model import config as model_config
from flt_jax.train import metrics as m


def _model(**kw):
  c = model_config.get_config()
  c.update(
    dict(
      vocab_size=100,
      n_layer=2,
      d_model=64,
      n_head=2,
      n_kv_head=1,
      kv_lora_rank=0,
      loops=3,
      loss_type="STEP",
      seq_len=32,
    )
  )
  c.update(kw)
  return model_config.ModelConfig.from_config(c)


def _block_shapes(c):
  """Parameter shapes of one layer, written out as the model defines them."""
  d, h = c.d_model, c.n_head
  hkv, hd = c.n_kv_head, c.d_model // c.n_head
  shapes = {
    "c_q": (d, h * hd),
    "c_proj": (h * hd, d),
    "mlp.c_fc": (d, 4 * d),
    "mlp.c_proj": (4 * d, d),
  }
  if c.kv_lora_rank:
    r = c.kv_lora_rank
    shapes.update({"c_kv_down": (d, r), "c_k_up": (r, hkv * hd), "c_v_up": (r, hkv * hd)})
  else:
    shapes.update({"c_k": (d, hkv * hd), "c_v": (d, hkv * hd)})
  return shapes


@pytest.mark.parametrize("loss_type,loss_loops", [("STEP", 3), ("END", 1), ("FEW", 1)])
@pytest.mark.parametrize("rank", [0, 16])
def test_flops_per_token_by_hand(loss_type, loss_loops, rank):
  c = _model(loss_type=loss_type, kv_lora_rank=rank)
  n_blocks = c.n_layer * sum(math.prod(s) for s in _block_shapes(c).values())
  k, vpad = 3, 128
  expected = (
    6 * n_blocks * k
    + 12 * c.n_layer * c.n_head * (c.d_model // c.n_head) * 32 * k
    + 6 * c.d_model * vpad * loss_loops
  )
  assert m.flops_per_token(c) == expected


def test_loss_loops():
  n = lambda loops, loss_type: len(_model(loss_type=loss_type).loss_loops(loops))
  assert n(12, "FEW") == 4  # loops 8..11.
  assert n(6, "FEW") == 2
  assert n(12, "STEP") == 12
  assert n(12, "END") == 1
  with pytest.raises(ValueError, match="loss_type"):
    n(3, "mean")


def test_peak_flops():
  assert m.peak_flops_per_device("tpu", "TPU v4") == 275e12
  assert m.peak_flops_per_device("tpu", "TPU v5 lite") == 197e12
  assert m.peak_flops_per_device("tpu", "TPU v5p") == 459e12
  assert m.peak_flops_per_device("tpu", "TPU v6 lite") == 918e12
  assert m.peak_flops_per_device("gpu", "NVIDIA H100 80GB HBM3") == 989e12
  assert m.peak_flops_per_device("cuda", "NVIDIA H200") == 989e12
  assert m.peak_flops_per_device("gpu", "NVIDIA A100-SXM4-40GB") == 312e12
  assert m.peak_flops_per_device("cpu", "cpu") == m.CPU_NOMINAL_PEAK_FLOPS
  # A host split into CPU devices (config.mesh.cpu_devices) shares its cores among them.
  assert m.peak_flops_per_device("cpu", "cpu", local_devices=2) == m.CPU_NOMINAL_PEAK_FLOPS / 2
  assert m.peak_flops_per_device("tpu", "TPU v4", local_devices=4) == 275e12
  assert m.peak_flops_per_device("gpu", "Mystery GPU") is None
  assert m.peak_flops_per_device("gpu", "Mystery GPU", override=5e14) == 5e14
  assert m.peak_flops_per_device() == m.CPU_NOMINAL_PEAK_FLOPS  # Tests: CPU.
  assert m.compute_mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
  assert m.compute_mfu(1000.0, 1e9, 2, None) is None


def _read_scalars(logdir):
  """Reads TFRecord-framed Event protos (no tensorboard dependency)."""
  out = {}
  for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      pos += 12  # length + its crc.
      event = event_pb2.Event.FromString(data[pos : pos + length])
      pos += length + 4  # payload + its crc.
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_metrics_writer_round_trip(tmp_path):
  w = m.MetricsWriter(tmp_path, enabled=True)
  w.write_scalars(1, {"train/loss": 3.5, "lr/muon": np.float32(0.02)})
  w.write_scalars(2, {"train/loss": 3.25})
  w.flush()
  w.close()
  scalars = _read_scalars(tmp_path / "tb")
  assert scalars["train/loss"] == [(1, 3.5), (2, 3.25)]
  assert scalars["lr/muon"][0][0] == 1
  assert scalars["lr/muon"][0][1] == pytest.approx(0.02)
  off = m.MetricsWriter(tmp_path / "off", enabled=False)
  off.write_scalars(1, {"x": 1.0})
  off.close()
  assert not (tmp_path / "off").exists()
  log = m.MetricsWriter(tmp_path / "log", enabled=False, jsonl=True)
  log.write_scalars(7, {"train/loss": 2.5})
  log.close()
  log = m.MetricsWriter(tmp_path / "log", enabled=False, jsonl=True)  # resumed: appends
  log.write_scalars(8, {"train/loss": 2.25})
  log.close()
  lines = (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [
    {"step": 7, "train/loss": 2.5},
    {"step": 8, "train/loss": 2.25},
  ]
  assert not (tmp_path / "log" / "tb").exists()


def test_metrics_jsonl_writes_non_finite_values_as_null(tmp_path):
  log = m.MetricsWriter(tmp_path, enabled=False, jsonl=True)
  log.write_scalars(1, {"a": float("nan"), "b": float("inf"), "c": 1.5})
  log.close()
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
    "step": 1,
    "a": None,
    "b": None,
    "c": 1.5,
  }


def test_step_scalar_tags_sort_in_loop_order():
  k = 12
  scalars = m.step_scalars(
    {
      "loss": 1.0,
      "grad_norm": 1.0,
      "loop_loss": np.arange(k, dtype=np.float32),
      "residual_norm": np.arange(k, dtype=np.float32),
      "layer_grad_norm": np.ones(3, np.float32),
    }
  )
  loop_tags = [t for t in scalars if t.startswith("loops/loss_")]
  assert loop_tags[0] == "loops/loss_00" and loop_tags[-1] == "loops/loss_11"
  assert [scalars[t] for t in sorted(loop_tags)] == list(range(k))


def test_format_eta():
  assert m.format_eta(0) == "0s"
  assert m.format_eta(45.4) == "45s"
  assert m.format_eta(192) == "3m12s"
  assert m.format_eta(3600 + 125) == "1h02m"
  assert m.format_eta(2 * 86400 + 3 * 3600 + 59) == "2d03h"
  assert m.format_eta(None) == "--"
  assert m.format_eta(float("inf")) == "--"


def test_console_logger_lines():
  t = [100.0]
  lines = []
  log = m.ConsoleLogger(1000, print_fn=lines.append, clock=lambda: t[0])
  first = log.log(100, 3.5, 45000.0, 0.123)
  assert first == ("step 100/1000 | loss 3.5000 | 45,000 tok/s | MFU 12.3% | ETA --")
  t[0] += 24.0  # 20 steps in 24 s -> 1.2 s/step, 880 steps left.
  line = log.log(120, 3.12344, 45000.0, 0.123)
  assert line == ("step 120/1000 | loss 3.1234 | 45,000 tok/s | MFU 12.3% | ETA 17m36s")
  assert m.format_progress(5, 10, 1.0) == "step 5/10 | loss 1.0000 | ETA --"
  summary = log.summary(1000, 2.98765, 524_288_000, elapsed_seconds=3725)
  assert summary == (
    "done 1000/1000 steps | final loss 2.9876 | 524,288,000 tokens | time 1h02m | 140,748 tok/s"
  )
  assert lines == [first, line, summary]


def test_metrics_jsonl_is_written_through_epath(tmp_path):
  """A gs:// workdir works for metrics.jsonl: the writer opens it through etils.epath
  (here a gs:// bucket mocked onto a local directory)."""
  local = lambda path: str(path).replace("gs://bucket", str(tmp_path))
  with epath.testing.mock_epath(
    open=lambda open_, path, mode: open_(local(path), mode),
    makedirs=lambda makedirs, path, **kw: makedirs(local(path), **kw),
    mkdir=lambda mkdir, path, **kw: mkdir(local(path), **kw),
    exists=lambda exists, path: exists(local(path)),
    isdir=lambda isdir, path: isdir(local(path)),
  ):
    for step in (1, 2):  # the second writer appends, as a resumed run does
      w = m.MetricsWriter("gs://bucket/run", enabled=False, jsonl=True)
      w.write_scalars(step, {"train/loss": 3.0 - step})
      w.close()
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [
    {"step": 1, "train/loss": 2.0},
    {"step": 2, "train/loss": 1.0},
  ]


def test_flops_of_a_windowed_step_count_forward_only_loops_at_a_third():
  """n = 7 loops with backprop_loops=3: 3 loops forward and backward, 4 forward only,
  lm_head for FEW's loops 4..6 that lie in the window (4..6)."""
  c = _model(loss_type="FEW", loops=6, max_loops=10, loop_sampling="uniform", backprop_loops=3)
  n_blocks = c.n_layer * sum(math.prod(s) for s in _block_shapes(c).values())
  per_loop = 6 * n_blocks + 12 * c.n_layer * c.n_head * (c.d_model // c.n_head) * 32
  expected = per_loop * 3 + per_loop * 4 / 3 + 6 * c.d_model * 128 * 3
  assert m.flops_per_token(c, 7) == pytest.approx(expected)
  # n = 2 < k: two loops, both with gradient; FEW at n=2 is loop 1.
  assert m.flops_per_token(c, 2) == pytest.approx(per_loop * 2 + 6 * c.d_model * 128)
  # Without n: the expectation over uniform 1..10.
  want = np.mean([m.flops_per_token(c, n) for n in range(1, 11)])
  assert m.flops_per_token(c) == pytest.approx(want)


def test_trained_loss_loops_inside_the_window():
  c = _model(loss_type="STEP", loops=6, max_loops=12, loop_sampling="uniform", backprop_loops=4)
  assert c.trained_loss_loops(10) == (6, 7, 8, 9)
  assert c.trained_loss_loops(3) == (0, 1, 2)
  few = _model(loss_type="FEW", loops=6, max_loops=24, loop_sampling="uniform", backprop_loops=4)
  assert few.trained_loss_loops(24) == (20, 21, 22, 23)  # 16..23, in the window
  assert few.trained_loss_loops(6) == (4, 5)
  end = _model(loss_type="END", loops=6, max_loops=24, loop_sampling="uniform")
  assert end.trained_loss_loops(9) == (8,) and end.gradient_window == 24


def test_step_scalars_of_a_drawn_count_show_the_loops_run():
  metrics = {
    "loss": 1.0,
    "grad_norm": 2.0,
    "loops": np.int32(3),
    "loop_loss": np.array([3.0, 2.0, 1.0, 0.0, 0.0]),
    "residual_norm": np.array([5.0, 6.0, 7.0, 0.0, 0.0]),
    "layer_grad_norm": np.array([0.5, 0.25]),
  }
  s = m.step_scalars(metrics)
  assert s["train/loops"] == 3.0
  assert sorted(k for k in s if k.startswith("loops/loss_")) == [
    "loops/loss_00",
    "loops/loss_01",
    "loops/loss_02",
  ]
  assert s["loops/residual_norm_02"] == 7.0 and "loops/residual_norm_03" not in s
