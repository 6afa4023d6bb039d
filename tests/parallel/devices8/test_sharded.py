"""The sharded train step on 8 simulated CPU devices against one device.

Runs in its own process (tests/parallel/test_devices8.py); the results of each mesh are
computed once per session and shared by the tests that read them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flt_jax.errors import ConfigError
from flt_jax.eval import step as eval_step_lib
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.parallel import sharding as sharding_lib
from tests.parallel import common

STEPS = 3
MESHES = {
  "data8": dict(data=8, fsdp=1, tensor=1),
  "fsdp8": dict(data=1, fsdp=8, tensor=1),
  "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
  "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
}
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)
# The mesh whose state is checkpointed after step 2 and restored on 4 and 1 devices.
CHECKPOINT_MESH = "data2_fsdp2_tensor2"
_cache: dict = {}


def _run(model: str, mesh_name: str):
  key = (model, mesh_name)
  if key not in _cache:
    sizes = ONE_DEVICE if mesh_name == "one" else MESHES[mesh_name]
    devices = jax.devices()[:1] if mesh_name == "one" else jax.devices()
    run = common.ShardedRun(common.program(model, devices, **sizes))
    initial = run.init()
    held = sharding_lib.bytes_per_device(initial)
    initial_params = jax.device_get(initial.params)  # before the donating steps
    after_step = None
    if model == "gqa" and mesh_name == CHECKPOINT_MESH:
      after_step = _save_after_two_steps
    state, losses = run.run(initial, common.host_batches(STEPS), after_step)
    _cache[key] = dict(
      run=run, state=state, losses=losses, initial_bytes=held, initial_params=initial_params
    )
  return _cache[key]


def _checkpoint_dir():
  out = os.environ.get("FLT_DEVICES8_OUT")
  return os.path.join(out, "ckpt_step2") if out else None


def _save_after_two_steps(step, state):
  if step == 2:
    path = _checkpoint_dir() or os.path.join(_tmp_dir(), "ckpt_step2")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    _cache["checkpoint"] = path


def _tmp_dir():
  if "tmp" not in _cache:
    _cache["tmp"] = tempfile.mkdtemp(prefix="flt_devices8_")
  return _cache["tmp"]


@pytest.mark.parametrize("model", sorted(common.MODELS))
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_steps_match_one_device(model, mesh_name):
  ref = _run(model, "one")
  got = _run(model, mesh_name)
  assert got["run"].mesh.devices.size == 8
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=1e-5)
  want = jax.device_get(ref["state"].params)
  have = jax.device_get(got["state"].params)
  for a, b in zip(
    jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(ref["initial_params"])
  ):
    assert np.max(np.abs(a - b)) > 1e-4  # every param was updated by the steps
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(have)[0], jax.tree_util.tree_leaves(want)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert int(got["state"].step) == STEPS


def test_sharded_eval_step_matches_one_device():
  got = _run("gqa", "fsdp4_tensor2")
  run = got["run"]
  eval_fn = functools.partial(eval_step_lib.eval_step, model=run.prog.model)
  step = sharding_lib.jit_eval_step(
    eval_fn, run.mesh, run.rules, run.shardings.params, run.batch_sharding
  )
  batch = common.host_batches(1, seed=1)[0]
  token_bytes_V = np.ones((common.VOCAB,), np.int32)
  sums = jax.device_get(step(got["state"].params, run.global_batch(batch), token_bytes_V))
  params = jax.device_get(got["state"].params)
  want = jax.device_get(jax.jit(eval_fn)(params, batch, token_bytes_V))
  assert int(sums["tokens"]) == int(want["tokens"]) > 0
  np.testing.assert_allclose(sums["nll"], want["nll"], rtol=1e-5)


def test_one_device_reference_is_the_plain_jit_step():
  """The reference the meshes are compared with: the sharded step on one device (with
  its strided micro-batches) gives the losses of the plain jax.jit of train_step."""
  prog = common.program("gqa", jax.devices()[:1], **ONE_DEVICE)
  state = jax.jit(prog.init_fn)(jax.random.PRNGKey(0))
  batches = [jax.device_put(b, jax.devices()[0]) for b in common.host_batches(STEPS)]
  # Compiled once: the initial state's types (weak ones included) serve every step.
  step = jax.jit(prog.step_fn()).lower(state, batches[0]).compile()
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(_run("gqa", "one")["losses"], losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", sorted(common.MODELS))
def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state(model):
  got = _run(model, "fsdp8")
  state = got["state"]
  for name, tree in (("params", state.params), ("opt_state", state.opt_state)):
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    held = sharding_lib.bytes_per_device(tree)
    assert len(held) == 8
    assert max(held.values()) <= total / 8 * 1.10, (name, total, held)
  # The state was born sharded: the same holds for the state before any step.
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  assert max(got["initial_bytes"].values()) <= total / 8 * 1.10


def _all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  shapes = []
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*\(?\w+\[([\d,]*)\][^=]*\ball-gather(?:-start)?\(", line)
    if match:
      shapes.append(tuple(int(d) for d in match.group(1).split(",") if d))
  return shapes


def test_data_parallel_step_never_gathers_the_activations():
  d_model, seq_len = 64, common.SEQ_LEN
  activations = {
    (common.MICRO_BATCH, seq_len, d_model),
    (common.GLOBAL_BATCH, seq_len, d_model),
    (common.MICRO_BATCH * seq_len, d_model),
    (common.GLOBAL_BATCH * seq_len, d_model),
  }
  data = _run("gqa", "data8")["run"]
  gathered = _all_gather_shapes(data.compiled_text())
  assert not [s for s in gathered if s in activations], gathered
  # The parser does find all-gathers where there are some: FSDP gathers its weights.
  fsdp_text = _run("gqa", "fsdp8")["run"].compiled_text()
  assert (2, 64, 256) in _all_gather_shapes(fsdp_text)  # mlp c_fc of both layers


def test_checkpoint_from_8_devices_restores_on_4():
  _run("gqa", CHECKPOINT_MESH)
  path = _cache["checkpoint"]
  expected_loss = _run("gqa", "one")["losses"][2]
  run = common.ShardedRun(common.program("gqa", jax.devices()[:4], data=2, fsdp=2, tensor=1))
  state = ocp.StandardCheckpointer().restore(path, run.abstract())
  leaf = state.params["blocks"]["layers"]["block"]["mlp"]["c_fc"]["kernel"]
  assert len(leaf.sharding.device_set) == 4 and int(state.step) == 2
  _, losses = run.run(state, common.host_batches(STEPS)[2:])
  np.testing.assert_allclose(losses[0], expected_loss, rtol=1e-5, atol=1e-5)
  if os.environ.get("FLT_DEVICES8_OUT"):  # the 1-device restore runs in the parent process
    with open(os.path.join(os.environ["FLT_DEVICES8_OUT"], "expected.json"), "w") as f:
      json.dump({"checkpoint": path, "loss_step3": expected_loss}, f)


# ----------------------------------------------------------------------------
# Clear errors.
# ----------------------------------------------------------------------------


def test_batch_not_dividing_over_data_and_fsdp_is_refused():
  prog = common.program("gqa", data=2, fsdp=4, tensor=1)
  mesh = mesh_lib.make_mesh(prog.config.mesh)
  rules = sharding_lib.logical_rules(prog.config.mesh)
  with pytest.raises(ConfigError, match=r"global batch does not divide by the 8 batch shards"):
    sharding_lib.check_batch(12, 4, mesh, rules)
  with pytest.raises(ConfigError, match=r"micro_batch_size=4 .*multiple of 8"):
    sharding_lib.check_batch(16, 4, mesh, rules)
  sharding_lib.check_batch(16, 8, mesh, rules)


def test_mesh_sizes_must_multiply_to_the_device_count():
  config = common.tiny_config("gqa", data=3, fsdp=2, tensor=1)
  with pytest.raises(ConfigError, match=r"data \* fsdp \* tensor = 6 but there are 8 devices"):
    mesh_lib.make_mesh(config.mesh)
  config.mesh.fsdp = -1
  with pytest.raises(ConfigError, match=r"multiply to 3, which does not divide the 8"):
    mesh_lib.make_mesh(config.mesh)
  config.mesh.data = 2
  assert dict(mesh_lib.make_mesh(config.mesh).shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_a_dimension_the_mesh_cannot_split_is_named():
  prog = common.program("gqa", data=1, fsdp=8, tensor=1)
  prog.config.mesh.rules.embed = ()
  prog.config.mesh.rules.layers = ("fsdp",)  # 2 layers over 8 devices
  mesh = mesh_lib.make_mesh(prog.config.mesh)
  rules = sharding_lib.logical_rules(prog.config.mesh)
  with pytest.raises(ConfigError, match=r"dimension 0 \(size 2\) cannot be split 8 ways"):
    sharding_lib.state_shardings(prog.abstract_state_boxed, mesh, rules)
