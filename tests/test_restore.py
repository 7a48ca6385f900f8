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
