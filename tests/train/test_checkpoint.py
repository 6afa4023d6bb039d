"""Checkpointer (Orbax manager), its record (new and legacy forms), config guard and
preemption handler."""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flt_jax.train import checkpoint as ckpt_lib


def _config(d_model=16, loops=2):
  return ml_collections.ConfigDict(
    {
      "model": {
        "vocab_size": 64,
        "n_layer": 2,
        "d_model": d_model,
        "n_head": 2,
        "n_kv_head": 2,
        "kv_lora_rank": 0,
        "variant": "FLT",
        "window_pattern": "L",
        "seq_len": 32,
        "loops": loops,
      },
      "checkpoint": {"every_steps": 2, "keep": 2, "async_save": True},
    }
  )


def _state(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {
    "wte": {"embedding": jax.random.normal(k[0], (8, 4))},
    "blocks": {"mlp": {"c_fc": jax.random.normal(k[1], (2, 4, 16))}},
  }
  opt_state = {
    "mu": jax.tree.map(lambda x: 0.5 * x, params),
    "count": jnp.int32(7),
    "lr": jnp.asarray(0.25, jnp.bfloat16),
  }
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed), "rng": k[2]}


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(state):
  return jax.eval_shape(lambda: state)


def _checkpointer(workdir, config=None, async_save=True):
  return ckpt_lib.Checkpointer(
    workdir, config=config or _config(), every_steps=1000, keep=0, async_save=async_save
  )


def test_round_trip_keep_n_and_resume(tmp_path):
  cfg = _config()
  ck = ckpt_lib.Checkpointer.from_config(tmp_path, cfg)
  assert ck.latest_step() is None
  saved = {}
  for step in range(1, 8):
    s = _state(step)
    assert ck.should_save(step) == (step % 2 == 0)
    if ck.save(step, s):
      saved[step] = s
  assert sorted(saved) == [2, 4, 6]  # every_steps=2, applied by Orbax
  assert ck.save(7, _state(7), force=True)  # Forced (e.g. SIGTERM/final).
  assert not ck.save(7, _state(99), force=True)  # Never overwrite.
  saved[7] = _state(7)
  ck.wait_until_finished()
  assert ck.all_steps() == [6, 7]  # keep=2.
  ck.close()

  # A fresh Checkpointer (restart) resumes from the latest step.
  ck2 = ckpt_lib.Checkpointer.from_config(tmp_path, cfg)
  assert ck2.latest_step() == 7
  abstract = _abstract(_state(0))
  _assert_same(ck2.restore(7, abstract)["state"], saved[7])
  _assert_same(ck2.restore(6, abstract)["state"], saved[6])
  assert ck2.saved_config(6)["model"]["loops"] == 2
  with pytest.raises(ValueError, match=r"step 2 .*\[6, 7\]"):
    ck2.restore(2, abstract)
  ck2.close()


def test_extra_items(tmp_path):
  ck = _checkpointer(tmp_path, async_save=False)
  ck.save(3, _state(3), extra_save_args={"data": ocp.args.JsonSave({"position": 123})}, force=True)
  abstract = _abstract(_state(0))
  out = ck.restore(3, abstract, extra_restore_args={"data": ocp.args.JsonRestore()})
  assert out["data"] == {"position": 123}
  # Extra items are optional on restore.
  assert set(ck.restore(3, abstract)) == {"state"}
  ck.close()


def test_mismatched_config_refused(tmp_path):
  ck = _checkpointer(tmp_path, _config(d_model=16), async_save=False)
  ck.save(1, _state(1), force=True)
  ck.close()
  # Loops may change (eval at another K).
  _checkpointer(tmp_path, _config(d_model=16, loops=12)).close()
  cfg = _config(d_model=32)
  cfg.model.window_pattern = "SSL"
  with pytest.raises(ValueError) as e:
    _checkpointer(tmp_path, cfg)
  msg = str(e.value)
  assert "model.d_model: saved 16, now 32" in msg
  assert "model.window_pattern: saved 'L', now 'SSL'" in msg
  assert "loops" not in msg
  assert "--workdir" in msg


def test_check_compatible_direct():
  a = {"model": {"d_model": 128, "n_layer": 2, "loops": 3}}
  ckpt_lib.check_compatible(a, {"model": {"d_model": 128, "n_layer": 2, "loops": 6}})
  with pytest.raises(ValueError, match=r"model.n_layer: saved 2, now 4"):
    ckpt_lib.check_compatible(a, {"model": {"d_model": 128, "n_layer": 4}})
  with pytest.raises(ValueError, match=r"model.seq_len: saved <absent>, now 64"):
    ckpt_lib.check_compatible(a, {"model": {"d_model": 128, "n_layer": 2, "seq_len": 64}})


def test_corrupt_checkpoint_error(tmp_path):
  ck = _checkpointer(tmp_path, async_save=False)
  ck.save(1, _state(1), force=True)
  ck.save(2, _state(2), force=True)
  step_dir = tmp_path / "checkpoints" / "2" / "state"
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  assert files
  for p in files:  # Truncate every file of the latest state item.
    p.write_bytes(b"")
  abstract = _abstract(_state(0))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ck.restore(2, abstract)
  msg = str(e.value)
  assert str(tmp_path / "checkpoints" / "2") in msg and "\n" not in msg
  # A failed read does not prove damage: no deletion advice, a way to step back instead.
  assert "Delete" not in msg and "rm " not in msg and "move it aside" in msg and "step 1" in msg
  # Nothing was deleted; the earlier step still restores.
  assert ck.all_steps() == [1, 2]
  _assert_same(ck.restore(1, abstract)["state"], _state(1))
  ck.close()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(
    ValueError,
    match=r"Cannot write to .*a_file/run/checkpoints: .*writable --workdir",
  ):
    _checkpointer(blocker / "run")


def test_preemption_handler_sets_flag_and_restores():
  calls = []
  previous = lambda signum, frame: calls.append(signum)
  old = signal.signal(signal.SIGTERM, previous)
  try:
    with ckpt_lib.PreemptionHandler(reached_preemption=lambda step: False) as handler:
      assert not handler.should_stop(1)
      os.kill(os.getpid(), signal.SIGTERM)
      assert handler.should_stop(2)
      assert calls == []  # our handler replaced the previous one
    assert signal.getsignal(signal.SIGTERM) is previous
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, old)


def test_real_optimizer_state_round_trip(tmp_path):
  """The optax state (MaskedNode, inject_hyperparams) survives save/restore."""
  from flt_jax.train import config as train_config
  from flt_jax.train import optimizer as opt_lib

  k = jax.random.split(jax.random.key(0), 3)
  params = {
    "wte": {"embedding": jax.random.normal(k[0], (16, 8))},
    "lm_head": {"kernel": jax.random.normal(k[1], (8, 16))},
    "blocks": {"c_q": jax.random.normal(k[2], (2, 8, 8))},
  }
  tx = opt_lib.make_optimizer(train_config.get_config().optim, d_model=8, total_steps=10)
  update = jax.jit(tx.update)
  _, opt_state = update(params, tx.init(params), params)
  state = {"params": params, "opt_state": opt_state, "step": jnp.int32(1), "rng": jax.random.key(1)}
  ck = _checkpointer(tmp_path)
  ck.save(1, state, force=True)
  ck.wait_until_finished()
  out = ck.restore(1, _abstract(state))["state"]
  assert jax.tree.structure(out) == jax.tree.structure(state)
  u_restored, _ = update(params, out["opt_state"], params)
  u_orig, _ = update(params, opt_state, params)
  _assert_same(u_restored, u_orig)
  ck.close()


def _flip_a_byte(step_dir):
  """Flips one bit in the middle of the largest array data file of the state item (OCDBT
  data files: `state/ocdbt.process_*/d/*`)."""
  files = sorted(step_dir.glob("state/ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  data = bytearray(files[-1].read_bytes())
  data[len(data) // 2] ^= 0x10
  files[-1].write_bytes(bytes(data))


def test_flipped_byte_is_found_on_restore(tmp_path):
  ck = _checkpointer(tmp_path)
  state = {**_state(1), "w": jax.random.normal(jax.random.PRNGKey(1), (64, 64))}
  ck.save(1, state, force=True)
  ck.save(2, state, force=True)
  ck.wait_until_finished()
  _flip_a_byte(tmp_path / "checkpoints" / "2")
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as e:
    ck.restore(2, _abstract(state))
  msg = str(e.value)
  step_dir = str(tmp_path / "checkpoints" / "2")
  assert f"The checkpoint {step_dir} is corrupt" in msg and "\n" not in msg
  assert f"Delete it (rm -r {step_dir})" in msg and "resume from step 1" in msg
  _assert_same(ck.restore(1, _abstract(state))["state"], state)  # the previous one is fine
  ck.close()


def test_checksums_do_not_depend_on_layout_and_see_each_word():
  from flt_jax.train.checkpoint import integrity

  x = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  base = integrity.checksums({"x": x, "b": x.astype(jnp.bfloat16), "f": jnp.array([True, False])})
  assert base == integrity.checksums(
    {"x": np.asarray(x), "b": x.astype(jnp.bfloat16), "f": jnp.array([True, False])}
  )
  one_word = integrity.checksums({"x": x.at[3, 1].set(x[3, 1] * 2)})["['x']"]
  swapped = integrity.checksums({"x": x[::-1]})["['x']"]
  assert one_word[0] != base["['x']"][0] and one_word[1] != base["['x']"][1]
  assert swapped[0] == base["['x']"][0] and swapped[1] != base["['x']"][1]


def _identity(sha="a" * 64):
  return {"name": "bpe", "vocab_size": 300, "eos_id": 0, "sha256": sha}


def test_another_tokenizer_of_the_same_size_is_refused(tmp_path, caplog):
  ck = ckpt_lib.Checkpointer(
    tmp_path, config=_config(), every_steps=10, keep=0, async_save=False, tokenizer=_identity()
  )
  ck.save(1, _state(1), force=True)
  ck.close()
  same = ckpt_lib.Checkpointer(
    tmp_path, config=_config(), every_steps=10, keep=0, async_save=False, tokenizer=_identity()
  )
  same.close()
  with pytest.raises(ValueError) as e:
    ckpt_lib.Checkpointer(
      tmp_path,
      config=_config(),
      every_steps=10,
      keep=0,
      async_save=False,
      tokenizer=_identity("b" * 64),
    )
  msg = str(e.value)
  assert "was trained with another tokenizer" in msg and "vocab 300" in msg and "\n" not in msg
  assert "sha256 aaaaaaaaaaaa" in msg and "sha256 bbbbbbbbbbbb" in msg


def test_checkpoint_without_a_tokenizer_record_resumes_with_a_warning(tmp_path, caplog):
  old = _checkpointer(tmp_path, async_save=False)  # records no tokenizer (as before)
  old.save(1, _state(1), force=True)
  old.close()
  ck = ckpt_lib.Checkpointer(
    tmp_path, config=_config(), every_steps=10, keep=0, async_save=False, tokenizer=_identity()
  )
  assert "records no tokenizer" in caplog.text
  _assert_same(ck.restore(1, _abstract(_state(1)))["state"], _state(1))
  ck.close()


def test_failed_async_save_is_reported_with_the_free_space(tmp_path, monkeypatch):
  import errno

  from orbax.checkpoint._src.serialization import serialization

  ck = _checkpointer(tmp_path)
  ck.save(1, _state(1), force=True)
  ck.wait_until_finished()

  async def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(serialization, "async_serialize_from_host", no_space)
  assert ck.save(2, _state(2), force=True)  # started; the write fails in the background
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    ck.wait_until_finished()
  monkeypatch.undo()
  msg = str(e.value)
  directory = str(tmp_path / "checkpoints")
  assert msg.startswith(
    f"Saving the checkpoint for step 2 to {directory} failed: OSError: [Errno 28]"
  )
  assert f"{directory} has " in msg and "free of" in msg and "(shutil.disk_usage)" in msg
  assert "([1]) are intact" in msg and "resume from step 1" in msg and "\n" not in msg
  ck.close()  # the failure was reported: closing does not raise it again
  again = _checkpointer(tmp_path)  # a resumed run
  assert again.all_steps() == [1]
  _assert_same(again.restore(1, _abstract(_state(1)))["state"], _state(1))
  again.save(3, _state(3), force=True)  # Orbax removes the unfinished step-2 files first
  again.wait_until_finished()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "3"]
  again.close()


def test_save_is_refused_before_writing_when_the_disk_is_too_small(tmp_path, monkeypatch):
  from flt_jax.train.checkpoint import manager

  ck = _checkpointer(tmp_path, async_save=False)
  ck.save(1, _state(1), force=True)
  usage = type("Usage", (), {"free": 1000, "total": 3 << 20, "used": 0})
  monkeypatch.setattr(manager.shutil, "disk_usage", lambda path: usage)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    ck.save(2, _state(2), force=True)
  msg = str(e.value)
  assert msg.startswith(
    f"Not saving step 2: a checkpoint of this run in {tmp_path / 'checkpoints'} needs about"
  )
  assert "has 0.0 MiB free of 3.0 MiB" in msg and "resume from step 1" in msg
  assert sorted(
    p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")
  ) == ["1"]
  with pytest.raises(ckpt_lib.CheckpointSaveError, match="^Not starting: a checkpoint of this"):
    ck.check_space(jax.eval_shape(lambda: _state(2)))  # at the start of a run
  ck.close()


def _data_state(position=123):
  return {"position": position, "window": [1, 2, 3]}


def _save_with_a_record_item(workdir, step, state, tokenizer, data):
  """A checkpoint as versions before the record moved into Orbax's step metadata wrote
  it: a JSON `record` item whose item checksums hold the sha256 itself."""
  from flt_jax.train.checkpoint import guard, integrity

  record = {
    "tokenizer": tokenizer,
    "checksum_format": integrity.FORMAT,
    "checksums": integrity.checksums(state),
    "item_checksums": {"data": integrity.json_checksum(data)},
  }
  manager = ocp.CheckpointManager(workdir / "checkpoints")
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(guard.config_json(_config())),
      record=ocp.args.JsonSave(record),
      data=ocp.args.JsonSave(data),
    ),
    force=True,
  )
  manager.close()


def _restore_with_data(ck, step, state, data):
  """Restores `step`; the data item is verified as the loop verifies the iterator's
  position: `data` stands for the content as restored."""
  return ck.restore(
    step,
    _abstract(state),
    extra_restore_args={"data": ocp.args.JsonRestore()},
    verify_extra={"data": lambda: data},
  )


def test_the_record_lives_in_orbax_step_metadata(tmp_path):
  ck = ckpt_lib.Checkpointer(
    tmp_path, config=_config(), every_steps=10, keep=0, async_save=True, tokenizer=_identity()
  )
  ck.save(
    1,
    _state(1),
    extra_save_args={"data": ocp.args.JsonSave(_data_state())},
    force=True,
    extra_states={"data": _data_state()},
  )
  ck.close()
  step_dir = tmp_path / "checkpoints" / "1"
  assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ["config", "data", "state"]
  from flt_jax.train.checkpoint import integrity

  record = ocp.metadata.get_step_metadata(step_dir).custom_metadata["flt_record"]
  assert record["tokenizer"] == _identity()
  assert record["checksums"] == integrity.checksums(_state(1))
  assert record["item_checksums"] == {"data": [integrity.json_checksum(_data_state())]}
  again = ckpt_lib.Checkpointer(tmp_path, config=_config(), tokenizer=_identity(), read_only=True)
  out = _restore_with_data(again, 1, _state(1), _data_state())
  _assert_same(out["state"], _state(1))
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="'data' item"):
    _restore_with_data(again, 1, _state(1), _data_state(124))
  again.close()


def test_a_checkpoint_with_a_record_item_restores_and_is_verified(tmp_path, caplog):
  state = {**_state(1), "w": jax.random.normal(jax.random.PRNGKey(1), (64, 64))}
  for step in (1, 2):
    _save_with_a_record_item(tmp_path, step, state, _identity(), _data_state())
  # Its tokenizer is checked, from the record item.
  with pytest.raises(ValueError, match="was trained with another tokenizer"):
    ckpt_lib.Checkpointer(tmp_path, config=_config(), tokenizer=_identity("b" * 64))
  ck = ckpt_lib.Checkpointer(tmp_path, config=_config(), tokenizer=_identity())
  _assert_same(_restore_with_data(ck, 2, state, _data_state())["state"], state)
  assert "not verified" not in caplog.text
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="'data' item"):
    _restore_with_data(ck, 2, state, _data_state(124))
  _flip_a_byte(tmp_path / "checkpoints" / "2")
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="arrays .* do not match"):
    ck.restore(2, _abstract(state))
  # A run resuming there saves its next steps the new way, beside the old ones.
  ck.save(3, state, force=True)
  ck.close()
  assert not (tmp_path / "checkpoints" / "3" / "record").exists()
  # A record item that was saved and is gone is refused, not skipped.
  shutil.rmtree(tmp_path / "checkpoints" / "1" / "record")
  reader = ckpt_lib.Checkpointer(tmp_path, read_only=True)
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match=r"'record' item .* is missing"):
    reader.restore(1, _abstract(state))
  _assert_same(reader.restore(3, _abstract(state))["state"], state)
  reader.close()


def test_a_missing_step_metadata_file_is_refused(tmp_path):
  ck = _checkpointer(tmp_path, async_save=False)
  ck.save(1, _state(1), force=True)
  ck.save(2, _state(2), force=True)
  ck.close()
  (tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA").unlink()
  reader = ckpt_lib.Checkpointer(tmp_path, read_only=True)
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as e:
    reader.restore(2, _abstract(_state(2)))
  msg = str(e.value)
  assert "_CHECKPOINT_METADATA" in msg and "resume from step 1" in msg and "\n" not in msg
  _assert_same(reader.restore(1, _abstract(_state(1)))["state"], _state(1))
  reader.close()


def test_the_saved_config_and_record_are_read_once(tmp_path, orbax_reads):
  ck = _checkpointer(tmp_path, async_save=False)
  ck.save(1, _state(1), force=True)
  ck.close()
  orbax_reads.clear()
  resumed = ckpt_lib.Checkpointer(tmp_path, config=_config(), tokenizer=_identity())
  assert sorted(orbax_reads) == ["config", "metadata"]  # the guard's reads
  assert resumed.saved_config(1)["model"]["d_model"] == 16
  resumed.restore(1, _abstract(_state(1)))
  assert sorted(orbax_reads) == ["config", "metadata", "state"]
  resumed.close()


def test_a_multi_host_preemption_stops_every_host_at_the_sync_step(tmp_path, monkeypatch):
  from jax.experimental import multihost_utils

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 5)
  ck = _checkpointer(tmp_path)  # every_steps=1000
  assert not ck.should_save(4) and ck.should_save(5)  # Orbax's policy saves the sync step
  assert ck.reached_preemption(5)
  before = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with ckpt_lib.PreemptionHandler(ck.reached_preemption) as handler:
    assert signal.getsignal(signal.SIGTERM) is before  # JAX's notifier keeps SIGTERM
    assert [handler.should_stop(step) for step in (4, 5)] == [False, True]
  monkeypatch.undo()
  ck.close()


def test_a_failed_save_on_another_host_stops_this_one(tmp_path, monkeypatch):
  from jax.experimental import multihost_utils

  ck = _checkpointer(tmp_path)
  ck.check_save_all_hosts()  # one host, nothing pending
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda flag: np.array([flag, 1]))
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    ck.check_save_all_hosts()
  monkeypatch.undo()
  assert str(e.value) == (
    f"Saving a checkpoint to {tmp_path / 'checkpoints'} failed on host(s) [1] (see their "
    "output); stopped. The checkpoints already saved are intact."
  )
  ck.close()


def test_each_host_checks_its_own_data_position(monkeypatch):
  from flt_jax.train.checkpoint import record

  new = {"item_checksums": {"data": ["aa", "bb"]}}
  legacy = {"item_checksums": {"data": "aa"}}  # process 0's alone
  for index, want_new, want_legacy in ((0, "aa", "aa"), (1, "bb", None)):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    assert record.item_checksum(new, "data") == want_new
    assert record.item_checksum(legacy, "data") == want_legacy
    assert record.item_checksum(new, "other") is None
  monkeypatch.setattr(jax, "process_count", lambda: 3)  # another host count: not checked
  assert record.item_checksum(new, "data") is None
