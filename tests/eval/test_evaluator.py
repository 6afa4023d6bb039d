"""The sharded evaluator against plain references: loss, bits per byte and answer
accuracy against a float64 per-token NLL computed with numpy from the model's logits;
h_change against h from separately run loop counts (and 0 at a fixed point); the score
function against full-sequence log-probabilities; only the arrays the step reads are
sent to the device; per-token exit's metrics and compute against the unsharded
teacher-forced pass, and at threshold 0 the fixed-K metrics."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.constants import IGNORE_LABEL, PAD_SEGMENT
from flt_jax.eval import evaluator as evaluator_lib
from flt_jax.model import exit as exit_lib
from flt_jax.model.decode import CachedDecoder
from flt_jax.model.looped import LoopedTransformer
from tests.helpers.models import model_config, random_params

VOCAB = 64
ROWS = 4


def _model(variant="FLT", **fields):
  shape = dict(n_layer=2, d_model=32, n_head=2, n_kv_head=2, vocab_size=VOCAB, seq_len=16)
  return LoopedTransformer(
    model_config(**shape, loops=3, variant=variant, window_pattern="L", kv_lora_rank=0, **fields)
  )


def _random_params(model, seed=0):
  return random_params(model.cfg, seed)


def _host_batches(count=2, length=12, seed=0):
  """Batches with ignored targets (padding) and answers on the last two positions."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    tokens = rng.integers(0, VOCAB, (ROWS, length + 1)).astype(np.int32)
    targets = tokens[:, 1:].copy()
    targets[1, 7:] = IGNORE_LABEL
    targets[3, 11:] = IGNORE_LABEL  # row 3's answer is half padding
    answer_mask = np.zeros_like(targets)
    answer_mask[:, -2:] = 1
    out.append({"inputs": tokens[:, :-1], "targets": targets, "answer_mask": answer_mask})
  return out


@functools.cache
def _forward_fn(model, loops):
  def forward(p, t):
    h, _ = model.apply({"params": p}, t, loops, method=model.hidden_states)
    return h, model.apply({"params": p}, h, method=model.logits)

  return jax.jit(forward)


def _forward(model, params, tokens, loops):
  """(h of the last loop, logits) of an unsharded forward, as float64."""
  h, logits = _forward_fn(model, loops)(params, tokens)
  return np.asarray(h, np.float64), np.asarray(logits, np.float64)


def _reference(model, params, batches, token_bytes, loops):
  """loss, bpb, answer accuracy and h_change from float64 numpy over plain forwards."""
  nll = tokens = n_bytes = answers = correct = change = 0.0
  for batch in batches:
    last, logits = _forward(model, params, batch["inputs"], loops)
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = batch["targets"] != IGNORE_LABEL
    safe = np.where(valid, batch["targets"], 0)
    picked = np.take_along_axis(logprobs, safe[..., None], -1)[..., 0]
    nll -= picked[valid].sum()
    tokens += valid.sum()
    n_bytes += token_bytes[safe][valid].sum()
    for b in range(ROWS):
      answer = (batch["answer_mask"][b] > 0) & valid[b]
      if answer.any():
        answers += 1
        correct += bool(np.all(logits[b].argmax(-1)[answer] == batch["targets"][b][answer]))
    if loops > 1:
      before, _ = _forward(model, params, batch["inputs"], loops - 1)
      relative = np.linalg.norm(last - before, axis=-1) / np.linalg.norm(before, axis=-1)
      change += relative[valid].sum()
  return {
    "loss": nll / tokens,
    "tokens": tokens,
    "bpb": nll / (math.log(2) * n_bytes),
    "answer_accuracy": correct / answers,
    "h_change": change / tokens if loops > 1 else math.nan,
  }


def test_metrics_and_h_change_match_a_numpy_reference(make_evaluator):
  model = _model("LT")
  params = _random_params(model)
  token_bytes = np.random.default_rng(1).integers(1, 4, VOCAB).astype(np.int32)
  evaluator = make_evaluator(model, ROWS, token_bytes)
  batches = _host_batches()
  for batch in batches:  # rows 0 and 2 answer with the model's own argmax at K'=3
    _, logits = _forward(model, params, batch["inputs"], 3)
    batch["targets"][::2, -2:] = logits[::2, -2:].argmax(-1)
  for loops in (1, 3):
    want = _reference(model, params, batches, token_bytes, loops)
    per_loop = evaluator.metrics(params, batches, loops, per_loop=True)
    runs = [per_loop]
    if loops == 3:  # the plain pass (training's eval) gives the same metrics, without h_change
      runs.append(evaluator.metrics(params, batches, loops))
      assert set(runs[-1]) == {"loss", "tokens", "bpb", "answer_accuracy"}
    for metrics in runs:
      assert metrics["tokens"] == want["tokens"] == 2 * ROWS * 12 - 2 * 5 - 2
      for name in ("loss", "bpb", "answer_accuracy"):
        assert metrics[name] == pytest.approx(want[name], rel=1e-5), (loops, name)
    if loops == 1:
      assert math.isnan(per_loop["h_change"])
      assert per_loop["answer_accuracy"] < 2 / 3
    else:
      assert per_loop["answer_accuracy"] >= 2 / 3  # row 3 by chance
      assert want["h_change"] > 1e-3  # random weights: the last loop still moves h
      assert per_loop["h_change"] == pytest.approx(want["h_change"], rel=1e-4)
  sweep = evaluator.sweep(params, lambda: batches, [3, 1], per_loop=True)
  assert list(sweep) == [3, 1] and sweep[3]["loss"] == per_loop["loss"]


def test_h_change_is_zero_at_a_fixed_point(make_evaluator):
  """With every output projection (c_proj) zero, each block is the identity (as at init):
  FLT restarts from the embedding every loop and computes the same h each time."""
  model = _model("FLT")
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.zeros_like(x) if "c_proj" in jax.tree_util.keystr(path) else x,
    _random_params(model),
  )
  evaluator = make_evaluator(model, ROWS)
  totals = evaluator.totals(params, _host_batches(1), 4, per_loop=True)
  assert totals["h_change_K1"].shape == (3,)
  np.testing.assert_array_equal(totals["h_change_K1"], 0.0)
  assert evaluator_lib.finish(totals)["h_change"] == 0.0


def test_no_target_tokens_is_a_clear_error(make_evaluator):
  model = _model()
  batch = _host_batches(1)[0]
  batch["targets"][:] = IGNORE_LABEL
  with pytest.raises(ValueError, match="no target tokens"):
    make_evaluator(model, ROWS).metrics(_random_params(model), [batch], 1)


def test_only_the_arrays_the_step_reads_are_sent(make_evaluator):
  """Segment ids and positions reach the eval step only with model.separate_documents."""
  z = np.zeros((ROWS, 8), np.int32)
  batch = {"inputs": z, "targets": z, "segment_ids": z + 1, "positions": z, "extra": z}
  sent = [
    sorted(make_evaluator(_model(separate_documents=s), ROWS).global_batch(batch))
    for s in (False, True)
  ]
  assert sent == [["inputs", "targets"], ["inputs", "positions", "segment_ids", "targets"]]


# ----------------------------------------------------------------------------- scoring

MAX_LEN = 24


def test_score_fn_matches_full_sequence_log_probabilities(tiny_lm, make_evaluator):
  model, params = tiny_lm.model, tiny_lm.params
  loops = 3
  rng = np.random.default_rng(0)
  # Few distinct lengths keep the compiles down: 7 input tokens, or MAX_LEN after truncation.
  pairs = [
    (rng.integers(0, 256, 5).tolist(), rng.integers(0, 256, 3).tolist()),
    (rng.integers(0, 256, 7).tolist(), rng.integers(0, 256, 1).tolist()),
    (rng.integers(0, 256, 2).tolist(), rng.integers(0, 256, 6).tolist()),
    # longer than MAX_LEN: the context is left-truncated
    (rng.integers(0, 256, 30).tolist(), rng.integers(0, 256, 4).tolist()),
  ]
  # A continuation that is the model's own argmax chain must come back greedy.
  context = rng.integers(0, 256, 5).tolist()
  chain = np.zeros([7], np.int32)
  chain[:5] = context
  for position in range(4, 7):  # right padding cannot change earlier positions (causal)
    next_token = int(np.argmax(tiny_lm.logits(chain, loops)[position]))
    if position + 1 < 7:
      chain[position + 1] = next_token
  pairs.append((context, chain[5:].tolist() + [next_token]))

  # Two rows per call: the length-8 bucket takes three calls, the last one part-filled.
  score_fn = make_evaluator(model, 2).score_fn(params, loops, MAX_LEN, min_bucket=8)
  got = score_fn(pairs)
  for (context, continuation), (logprob, greedy) in zip(pairs, got):
    want_logprob, want_greedy = tiny_lm.loglikelihood(context, continuation, loops, MAX_LEN)
    assert logprob == pytest.approx(want_logprob, abs=1e-4)
    assert greedy == want_greedy
  assert got[-1][1] is True
  assert not all(g for _, g in got[:-1])


def test_score_fn_errors(tiny_lm, make_evaluator):
  evaluator = make_evaluator(tiny_lm.model, 2)
  with pytest.raises(ValueError, match="rotary table"):
    evaluator.score_fn(tiny_lm.params, 2, 10**6)
  with pytest.raises(ValueError, match="positive multiple of 1"):
    evaluator.score_fn(tiny_lm.params, 2, 8, rows=0)
  score_fn = evaluator.score_fn(tiny_lm.params, 2, 8)
  with pytest.raises(ValueError, match="does not fit max_len=8"):
    score_fn([([1], list(range(9)))])
  with pytest.raises(ValueError, match="empty context"):
    score_fn([([], [1])])


# ----------------------------------------------------------------------------- exit


def _exit_reference(model, params, batches, rule):
  """Loss, answer accuracy and the exit figures from the unsharded teacher-forced pass
  (CachedDecoder.forward_exit) and float64 numpy."""
  decoder = CachedDecoder(model.cfg)

  @jax.jit
  def forward(params, tokens, real):
    h, exits = decoder.forward_exit(params, tokens, rule, real_BxT=real)
    return decoder.logits(params, h), exits.exit_loops_BxT

  nll = tokens = answers = correct = 0.0
  loops = {"targets": [], "answers": [], "inputs": []}
  executed = []
  for batch in batches:
    real = batch["segment_ids"] != PAD_SEGMENT
    logits, exit_loops = (np.asarray(a, np.float64) for a in forward(params, batch["inputs"], real))
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = batch["targets"] != IGNORE_LABEL
    picked = np.take_along_axis(logprobs, np.where(valid, batch["targets"], 0)[..., None], -1)
    nll -= picked[..., 0][valid].sum()
    tokens += valid.sum()
    answer = (batch["answer_mask"] > 0) & valid
    for b in range(ROWS):
      if answer[b].any():
        answers += 1
        correct += bool(np.all(logits[b].argmax(-1)[answer[b]] == batch["targets"][b][answer[b]]))
    loops["targets"] += exit_loops[valid].tolist()
    loops["answers"] += exit_loops[answer].tolist()
    loops["inputs"] += exit_loops[real].tolist()
    executed.append(exit_loops[real].max())  # the pass runs while any real token is active
  return {
    "loss": nll / tokens,
    "answer_accuracy": correct / answers,
    "mean_exit_loop": np.mean(loops["targets"]),
    "mean_exit_loop_answers": np.mean(loops["answers"]),
    "mean_exit_loop_inputs": np.mean(loops["inputs"]),
    "executed_loops": np.mean(executed),
  }


def test_exit_metrics_match_the_teacher_forced_pass(make_evaluator):
  model = _model("LT_ia")
  params = _random_params(model)
  evaluator = make_evaluator(model, ROWS)
  batches = _host_batches()
  for batch in batches:  # padding at the end of two rows: not real, targets ignored
    batch["segment_ids"] = np.ones_like(batch["inputs"])
    batch["segment_ids"][1, 8:] = PAD_SEGMENT
    batch["segment_ids"][3, 11:] = PAD_SEGMENT
  fixed = evaluator.metrics(params, batches, 3)
  for criterion in exit_lib.CRITERIA:  # threshold 0: the fixed K=3 metrics, 3 loops each
    got = evaluator.exit_metrics(params, batches, exit_lib.ExitRule(criterion, 0.0, 1, 3))
    for name in ("loss", "bpb", "answer_accuracy"):
      assert got[name] == pytest.approx(fixed[name], rel=1e-6), (criterion, name)
    for name in ("mean_exit_loop", "mean_exit_loop_answers", "mean_exit_loop_inputs"):
      assert got[name] == 3.0
    assert got["executed_loops"] == 3.0
  rule = exit_lib.ExitRule("latent_diff", 0.5, 1, 3)
  got = evaluator.exit_metrics(params, batches, rule)
  want = _exit_reference(model, params, batches, rule)
  assert 1.0 < want["mean_exit_loop_inputs"] < 3.0  # tokens exit at different loops
  for name, value in want.items():
    assert got[name] == pytest.approx(value, rel=1e-5), name
  # the threshold is an argument: another threshold of the criterion reuses the program
  compiled = len(evaluator._compiled)  # pylint: disable=protected-access
  evaluator.exit_metrics(params, batches, exit_lib.ExitRule("latent_diff", 0.2, 1, 3))
  assert len(evaluator._compiled) == compiled  # pylint: disable=protected-access
