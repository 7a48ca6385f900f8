"""train_state.Checkpointer.restore_latest on one process: a torn step is skipped, a transient
read error is retried, a saved tree that differs from the run's state is an error naming it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explore_jax.train import state as train_state


def _state(width=4, extra=False):
  actor = {"w": jnp.arange(width * 3, dtype=jnp.float32).reshape(width, 3), "b": jnp.ones((3,))}
  if extra:
    actor["c"] = jnp.zeros((2,))
  return train_state.TrainState(step=jnp.array(0, jnp.int32), rng=jax.random.PRNGKey(0),
                                actor=actor, actor_opt={"mu": jnp.zeros((3,))})


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _saved(tmp_path, steps=(1, 2)):
  ckpt = train_state.Checkpointer(str(tmp_path / "ckpt"), keep=5)
  for s in steps:
    st = _state()
    ckpt.save(s, st.replace(step=jnp.array(s, jnp.int32), actor={**st.actor, "b": st.actor["b"] * s}),
              {"pos": s})
  ckpt.close()
  return train_state.Checkpointer(str(tmp_path / "ckpt"), keep=5)


def test_newest_step_restores(tmp_path):
  state, data = _saved(tmp_path).restore_latest(_abstract(_state()))
  assert int(state.step) == 2 and data == {"pos": 2}
  np.testing.assert_array_equal(state.actor["b"], 2 * np.ones(3))


def test_torn_step_is_skipped(tmp_path):
  ckpt = _saved(tmp_path)
  for f in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  state, data = ckpt.restore_latest(_abstract(_state()))
  assert int(state.step) == 1 and data == {"pos": 1}
  assert any(p.name.startswith("torn_2_") for p in (tmp_path / "ckpt").iterdir())


def test_transient_error_is_retried(tmp_path, monkeypatch):
  ckpt = _saved(tmp_path)
  real, calls = ckpt.manager.restore, []

  def flaky(step, **kw):
    calls.append(step)
    if len(calls) <= 2:
      raise ConnectionResetError("bucket went away")
    return real(step, **kw)

  monkeypatch.setattr(ckpt.manager, "restore", flaky)
  state, _ = ckpt.restore_latest(_abstract(_state()), backoff_s=0)
  assert int(state.step) == 2 and calls == [2, 2, 2]  # the newest step, not an older one
  calls.clear()
  monkeypatch.setattr(ckpt.manager, "restore", lambda step, **kw: (_ for _ in ()).throw(
      TimeoutError("read timed out")))
  with pytest.raises(RuntimeError, match="step 2 could not be read after 3 tries"):
    ckpt.restore_latest(_abstract(_state()), retries=2, backoff_s=0)


@pytest.mark.parametrize("other, message", [
    (dict(width=5), r"saved shapes differ, e\.g\. actor/w: saved \(4, 3\), this run \(5, 3\)"),
    (dict(extra=True), r"saved tree differs: missing \['actor/c'\]"),
])
def test_structure_mismatch_is_an_error(tmp_path, other, message):
  with pytest.raises(ValueError, match="step 2 does not match this run's state") as e:
    _saved(tmp_path).restore_latest(_abstract(_state(**other)))
  assert e.match(message)
  assert (tmp_path / "ckpt" / "2").is_dir()  # nothing set aside: the run's config is at fault


def test_step_decision_on_one_process():
  """Stop on this process's SIGTERM; save for time once `every_minutes` passed (0: never)."""
  import time

  from explore_jax.train import loop
  now = time.monotonic()
  assert loop.step_decision(True, now, 0.0) == (True, False)
  assert loop.step_decision(False, now - 61, 1.0) == (False, True)
  assert loop.step_decision(False, now - 59, 1.0) == (False, False)
  assert loop.step_decision(False, now - 1e6, 0.0) == (False, False)


def _largest_data_file(step_dir):
  return max((f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)),
             key=lambda f: f.stat().st_size)


def test_flipped_bytes_are_caught_and_the_step_before_restored(tmp_path, caplog):
  """400 bytes flipped inside a data file of the newest step (same size): orbax reads it back
  without an error; the digest recorded at save does not match, so the step is set aside as
  corrupt and the previous one restored, with a warning naming the step and the array."""
  ckpt = train_state.Checkpointer(str(tmp_path / "ckpt"), keep=5)
  big = {"w": jnp.asarray(np.random.RandomState(0).randn(64, 256).astype(np.float32)),
         "b": jnp.ones((3,))}
  for s in (1, 2):
    ckpt.save(s, train_state.TrainState(step=jnp.array(s, jnp.int32), rng=jax.random.PRNGKey(0),
                                        actor=big, actor_opt={"mu": jnp.zeros((3,))}), {"pos": s})
  ckpt.close()
  target = _largest_data_file(tmp_path / "ckpt" / "2")
  size = target.stat().st_size
  raw = bytearray(target.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + 400] = bytes(b ^ 0xFF for b in raw[middle:middle + 400])
  target.write_bytes(bytes(raw))
  assert target.stat().st_size == size
  abstract = _abstract(train_state.TrainState(
      step=jnp.array(0, jnp.int32), rng=jax.random.PRNGKey(0), actor=big,
      actor_opt={"mu": jnp.zeros((3,))}))
  state, data = train_state.Checkpointer(str(tmp_path / "ckpt"), keep=5).restore_latest(abstract)
  assert int(state.step) == 1 and data == {"pos": 1}
  warning = [r.getMessage() for r in caplog.records if "checkpoint step 2" in r.getMessage()]
  assert warning and "does not hold what was saved" in warning[0], caplog.text
  assert "1 array differs from its digest at save: actor/w" in warning[0], warning[0]
  assert [p.name.split("_")[0] for p in (tmp_path / "ckpt").iterdir()
          if not p.name.isdigit()] == ["corrupt"]


def test_a_checkpoint_without_digests_still_restores(tmp_path):
  """Checkpoints written before digests existed: read, checked for finiteness only."""
  import shutil
  ckpt = _saved(tmp_path)
  shutil.rmtree(tmp_path / "ckpt" / "2" / train_state.DIGEST_ITEM)
  state, data = ckpt.restore_latest(_abstract(_state()))
  assert int(state.step) == 2 and data == {"pos": 2}


def test_a_non_finite_state_is_neither_saved_nor_restored(tmp_path, caplog):
  ckpt = train_state.Checkpointer(str(tmp_path / "ckpt"), keep=5)
  st = _state()
  bad = st.replace(actor_opt={"mu": jnp.array([0.0, jnp.inf, 0.0])})
  with pytest.raises(FloatingPointError, match=r"non-finite values in actor_opt/mu"):
    ckpt.save(1, bad, {"pos": 1})
  # One written by an older release (no guard, no digest) is set aside at restore.
  import orbax.checkpoint as ocp
  ckpt.manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                               data=ocp.args.JsonSave({"pos": 1})), force=True)
  ckpt.close()
  restored = train_state.Checkpointer(str(tmp_path / "ckpt"), keep=5).restore_latest(
      _abstract(st))
  assert restored is None and "non-finite values in actor_opt/mu" in caplog.text


def test_keep_must_be_at_least_one(tmp_path):
  with pytest.raises(ValueError, match="keep_checkpoints=0: must be >= 1"):
    train_state.Checkpointer(str(tmp_path / "ckpt"), keep=0)
  assert not (tmp_path / "ckpt").exists()


def test_a_relative_directory_restores(tmp_path, monkeypatch):
  """A relative directory (as `--workdir rel` gives) was read by orbax without its metadata, and
  its complete newest step set aside as torn."""
  monkeypatch.chdir(tmp_path)
  ckpt = train_state.Checkpointer("rel/ckpt", keep=5)
  ckpt.save(1, _state(), {"pos": 1})
  ckpt.close()
  ckpt = train_state.Checkpointer("rel/ckpt", keep=5)
  assert ckpt.directory == str(tmp_path / "rel" / "ckpt")
  state, data = ckpt.restore_latest(_abstract(_state()))
  assert data == {"pos": 1}
  assert sorted(p.name for p in (tmp_path / "rel" / "ckpt").iterdir()) == ["1"]


def test_export_refuses_an_actor_that_is_not_what_was_saved(tmp_path):
  """`run-to-hf` reads the actor alone; its arrays are checked against the same digests."""
  from explore_jax.train import export
  _saved(tmp_path).close()
  actor = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": 2 * np.ones(3, np.float32)}
  export.check_actor(str(tmp_path / "ckpt"), 2, actor)  # step 2's actor, as saved
  actor["w"][1, 2] = np.nextafter(actor["w"][1, 2], np.float32(9))  # one bit
  with pytest.raises(ValueError, match=r"checkpoint step 2 is corrupt: actor/w differ"):
    export.check_actor(str(tmp_path / "ckpt"), 2, actor)
  actor = {"w": np.full((4, 3), np.nan, np.float32), "b": np.ones(3, np.float32)}
  with pytest.raises(ValueError, match=r"non-finite values in actor/w"):
    export.check_actor(str(tmp_path / "ckpt"), 1, actor)
