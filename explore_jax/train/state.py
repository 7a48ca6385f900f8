"""The train state: one pytree, built from shapes, sharded by logical axes, checkpointed whole.

    TrainState(step, rng, actor, actor_opt, critic, critic_opt)

`critic`/`critic_opt` are None for GRPO. The data-iterator state (a small JSON dict) is saved in the
same orbax checkpoint step as a second item, so a checkpoint is complete by construction. A third
item, `digest`, records a digest of every array (`train.digest`): a restore that reads back
anything else, or a non-finite value, sets the step aside and takes the one before.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, PartitionSpec as P

from explore_jax import paths
from explore_jax.models import qwen2
from explore_jax.tpu import sharding
from explore_jax.train import digest

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array  # [] int32: rollouts completed
  rng: Array  # uint32[2] raw PRNG key; folded with the step for every random choice
  actor: Any
  actor_opt: Any
  critic: Any = None
  critic_opt: Any = None


# --------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------


def lr_schedule(lr: float, optim: ml_collections.ConfigDict, total_updates: int) -> optax.Schedule:
  warmup = optim.warmup_steps
  if optim.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_updates - warmup, 1))
  else:
    raise ValueError(f"optim.schedule={optim.schedule!r}: use 'constant' or 'cosine'")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(schedule: optax.Schedule, optim: ml_collections.ConfigDict):
  """AdamW after global-norm clipping; the clip is part of the optimizer so resume restores it."""
  return optax.chain(
      optax.clip_by_global_norm(optim.max_grad_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mu_dtype=jnp.float32))


# --------------------------------------------------------------------------------------------------
# Shapes and shardings
# --------------------------------------------------------------------------------------------------


def _is_spec(x):
  return isinstance(x, P)


def abstract_state(model_cfg: qwen2.Qwen2Config, actor_tx, critic_tx, ppo: bool):
  """(ShapeDtypeStruct pytree, logical PartitionSpec pytree) of the TrainState; allocates nothing."""
  actor = qwen2.param_shapes(model_cfg)
  actor_specs = qwen2.logical_axes(model_cfg)
  opt_specs = lambda tx, shapes, specs: optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, shapes), specs,
      transform_non_params=lambda _: P(), is_leaf=_is_spec)
  # The key under eval_shape: an eager op would run on the mesh's devices (a TPU topology's
  # devices in explore_jax.aot exist only to compile for).
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  shapes = dict(step=jax.ShapeDtypeStruct((), jnp.int32), rng=rng, actor=actor,
                actor_opt=jax.eval_shape(actor_tx.init, actor))
  specs = dict(step=P(), rng=P(), actor=actor_specs,
               actor_opt=opt_specs(actor_tx, actor, actor_specs))
  if ppo:
    critic = qwen2.param_shapes(model_cfg, critic=True)
    critic_specs = qwen2.logical_axes(model_cfg, critic=True)
    shapes.update(critic=critic, critic_opt=jax.eval_shape(critic_tx.init, critic))
    specs.update(critic=critic_specs, critic_opt=opt_specs(critic_tx, critic, critic_specs))
  return TrainState(**shapes), TrainState(**specs)


def state_shardings(shapes: TrainState, specs: TrainState, mesh: Mesh, rules) -> TrainState:
  return sharding.logical_to_mesh(specs, shapes, mesh, rules)


def init_state(model_cfg, actor_params, actor_tx, critic_tx, ppo: bool, seed: int,
               shardings: TrainState) -> TrainState:
  """Optimizer states (and the critic, from the actor's backbone) built straight into shardings."""

  def build(actor):
    critic = qwen2.critic_from_actor(actor, model_cfg) if ppo else None
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed), actor=actor,
                      actor_opt=actor_tx.init(actor), critic=critic,
                      critic_opt=critic_tx.init(critic) if ppo else None)

  return jax.jit(build, out_shardings=shardings)(actor_params)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def saved_layout(state_dir: str) -> str | None:
  """"stacked" or "per-layer": how the actor's decoder layers are laid out in an orbax state
  directory, read from its tree metadata; None when that cannot be read (a torn step)."""
  import json
  from etils import epath
  try:
    keys = json.loads((epath.Path(state_dir) / "_METADATA").read_text())["tree_metadata"]
  except Exception:  # missing or unreadable: the restore below decides
    return None
  for key in keys:
    if key.startswith("('actor', 'model', 'layers'"):
      return "stacked"
    if key.startswith("('actor', 'model', 'layers_"):
      return "per-layer"
  return None


# Outcomes of restoring one step on one process, in order of precedence when processes differ.
# CORRUPT: read completely, but not what was saved (digest) or not finite.
OK, TORN, CORRUPT, TRANSIENT, MISMATCH = 0, 1, 2, 3, 4
DIGEST_ITEM = "digest"


def agree_outcome(outcome: int) -> tuple[int, int]:
  """(the worst outcome over processes, the first process that had it)."""
  every = sharding.gather_ints([outcome])[:, 0]
  worst = int(every.max())
  return worst, int(np.argmax(every == worst))


def structure_mismatch(abstract, meta) -> str:
  """'' when the saved tree `meta` (orbax metadata: leaves with .shape) has the paths and shapes
  of `abstract`; else what differs, naming the first paths."""
  # Paths as names: orbax saves named tuples (optax states) as dicts, attributes as keys.
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  flat = lambda t: {"/".join(map(name, path)): v for path, v in
                    jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: x is None)[0]}
  want = {k: v for k, v in flat(jax.tree.map(lambda x: x, abstract.__dict__ if isinstance(
      abstract, TrainState) else abstract)).items() if v is not None}
  have = {k: v for k, v in flat(meta).items() if v is not None and hasattr(v, "shape")}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    return (f"saved tree differs: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
  shapes = [k for k in sorted(want) if tuple(want[k].shape) != tuple(have[k].shape)]
  if shapes:
    k = shapes[0]
    return (f"{len(shapes)} saved shapes differ, e.g. {k}: saved {tuple(have[k].shape)}, this "
            f"run {tuple(want[k].shape)}")
  return ""


def _verify(state: TrainState, record: dict | None) -> str:
  """'' when every array of a restored `state` has the digest `record` holds for it (when there
  is a record) and every float array is finite; else what differs, naming the arrays."""
  read, nonfinite = digest.compute(state)
  differ = digest.differences(record["arrays"], read) if record is not None else []
  problems = []
  if differ:
    problems.append(f"{len(differ)} array{'s differ' if len(differ) > 1 else ' differs'} from "
                    f"its digest at save: {', '.join(differ[:3])}"
                    f"{'...' if len(differ) > 3 else ''}")
  if nonfinite:
    problems.append(f"non-finite values in {', '.join(nonfinite[:3])}"
                    f"{'...' if len(nonfinite) > 3 else ''}")
  return "; ".join(problems)


def _join_restore_barrier(manager: ocp.CheckpointManager) -> None:
  """Orbax's `Checkpointer.restore` reads, then waits in a barrier of every process
  ("Checkpointer:restore", orbax/checkpoint/_src/checkpointers/checkpointer.py). A process whose
  read raised (a chunk that does not decode on the host that reads it, say) never reaches it; it
  joins it here, so that the others leave it and every process's next collective meets the
  same one on the others (without this they hang, or pair the barrier with the outcomes' gather)."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint._src.multihost import multihost
  checkpointer = manager._checkpointer  # pylint: disable=protected-access
  multihost.sync_global_processes(
      multihost.unique_barrier_key("Checkpointer:restore",
                                   prefix=checkpointer._barrier_sync_key_prefix),
      processes=checkpointer._active_processes)


class Checkpointer:
  """Orbax CheckpointManager over (state pytree, data-iterator JSON), robust to torn directories."""

  def __init__(self, directory: str, keep: int):
    if keep < 1:  # orbax's max_to_keep=0 deletes each checkpoint right after writing it
      raise ValueError(f"keep_checkpoints={keep}: must be >= 1")
    # Absolute: every read below (orbax's and ours) sees the same directory, so a step is set
    # aside as torn only when it cannot be read there.
    self.directory = paths.absolute(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True))

  def save(self, step: int, state: TrainState, data_state: dict) -> None:
    """Save `step` (asynchronously) with the digest of every array, computed first on the
    devices. A state holding a non-finite value is refused: the update's guard keeps one from
    ever being trained, so it would be a fault to report, not a checkpoint to keep."""
    digests, nonfinite = digest.compute(state)
    if nonfinite:
      raise FloatingPointError(f"step {step}: the train state holds non-finite values in "
                               f"{', '.join(nonfinite[:3])}; not saved to {self.directory}")
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        **{DIGEST_ITEM: ocp.args.JsonSave({"arrays": digests})}), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore_latest(self, abstract: TrainState, retries: int = 3, backoff_s: float = 2.0
                     ) -> tuple[TrainState, dict] | None:
    """The newest step that every process restores completely; None (fresh start) when there is
    none. Every process tries the same step (process 0's list) and the outcomes are agreed:
    a transient read error (an OSError other than a missing file) is retried `retries` times by
    all, a torn step (missing or unreadable files) or a corrupt one (read back, but an array
    differs from its digest at save or holds a non-finite value) is set aside and skipped by
    all, and a checkpoint whose tree or shapes differ from `abstract` is an error on every
    process, never a silent fresh start."""
    steps = sharding.steps_from_main(sorted(self.manager.all_steps(), reverse=True))
    for step in steps:
      for attempt in range(retries + 1):
        # First each process checks its view of the step alone (orbax's restore is collective:
        # a process failing inside it would leave the others in its barrier), then all read.
        outcome, detail = self._probe(step, abstract)
        worst, who = agree_outcome(outcome)
        restored = None
        if worst == OK:
          outcome, detail, restored = self._read(step, abstract)
          worst, who = agree_outcome(outcome)
        if worst != TRANSIENT:
          break
        logging.warning("checkpoint step %d: transient read error on process %d (%s); retry "
                        "%d of %d", step, who, detail, attempt + 1, retries)
        time.sleep(backoff_s * 2**attempt)
      if worst == OK:
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return restored.state, dict(restored.data)
      if worst == MISMATCH or worst == TRANSIENT:
        what = ("does not match this run's state" if worst == MISMATCH else
                f"could not be read after {retries + 1} tries")
        error = ValueError if worst == MISMATCH else RuntimeError  # a mismatch is the config's
        raise error(f"{self.directory}: checkpoint step {step} {what} (process {who}"
                           f"{': ' + detail if detail else ', see its log'}); no process "
                           "restored it. Fix the workdir or the config, or use a fresh workdir.")
      self._set_aside(step, worst, who, detail)
    logging.info("no complete checkpoint in %s: starting fresh", self.directory)
    return None

  def _set_aside(self, step: int, outcome: int, who: int, detail: str) -> None:
    """Every process skips `step`; process 0 moves a local one to torn_STEP_TIME (unreadable) or
    corrupt_STEP_TIME (read, but not what was saved), where it can be looked at."""
    what = "is incomplete" if outcome == TORN else "does not hold what was saved"
    logging.warning("checkpoint step %d in %s %s on process %d (%s); every process skips it "
                    "for an earlier step", step, self.directory, what, who,
                    detail or "see its log")
    if jax.process_index() == 0 and "://" not in self.directory:
      kind = "torn" if outcome == TORN else "corrupt"
      aside = os.path.join(self.directory, f"{kind}_{step}_{int(time.time())}")
      os.rename(os.path.join(self.directory, str(step)), aside)
      logging.warning("moved it to %s", aside)
    sharding.barrier(f"checkpoint step {step} set aside")
    self.manager.reload()

  def _probe(self, step: int, abstract: TrainState) -> tuple[int, str]:
    """(outcome, detail) of reading `step`'s tree metadata on this process alone."""
    path = os.path.join(self.directory, str(step), "state")
    try:
      meta = ocp.PyTreeCheckpointer().metadata(path)
      meta = getattr(meta, "item_metadata", meta)
      meta = getattr(meta, "tree", meta)
    except FileNotFoundError as e:
      return TORN, f"{type(e).__name__}: {str(e)[:200]}"
    except OSError as e:  # a network or bucket error: may succeed on a retry
      return TRANSIENT, f"{type(e).__name__}: {str(e)[:200]}"
    except Exception as e:  # no readable metadata: written in part
      return TORN, f"{type(e).__name__}: {str(e)[:200]}"
    if not jax.tree.leaves(meta, is_leaf=lambda x: hasattr(x, "shape")):
      return TORN, "no readable metadata"
    actor = getattr(abstract, "actor", None)
    want = qwen2.params_layout(actor) if isinstance(actor, dict) and "model" in actor else None
    saved = saved_layout(path) if want is not None else None
    if saved is not None and saved != want:  # scan_layers differs: say so, not "a tree differs"
      return MISMATCH, (f"the checkpoint's parameters are {saved} (model.scan_layers="
                        f"{saved == 'stacked'}) but this config has model.scan_layers="
                        f"{want == 'stacked'}; set it to match the run, or start a fresh workdir "
                        "(`python -m explore_jax.convert restack` converts model checkpoints)")
    problem = structure_mismatch(abstract, meta)
    return (MISMATCH, problem) if problem else (OK, "")

  def _read(self, step: int, abstract: TrainState):
    """(outcome, detail, restored or None) of orbax's (collective) restore of `step`, checked
    against its digests (`_verify`)."""
    from etils import epath
    items = dict(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    has_digest = (epath.Path(self.directory) / str(step) / DIGEST_ITEM).exists()
    if has_digest:  # (checkpoints written before digests existed have none)
      items[DIGEST_ITEM] = ocp.args.JsonRestore()
    restored, outcome, detail = None, OK, ""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except FileNotFoundError as e:
      outcome, detail = TORN, f"{type(e).__name__}: {str(e)[:200]}"
    except OSError as e:  # a network or bucket error: may succeed on a retry
      outcome, detail = TRANSIENT, f"{type(e).__name__}: {str(e)[:200]}"
    except Exception as e:  # corrupt or truncated files
      outcome, detail = TORN, f"{type(e).__name__}: {str(e)[:200]}"
    if restored is None:
      _join_restore_barrier(self.manager)
    # The digests are computed by programs over the global arrays, which every process must run
    # or none: a process whose read failed would leave the others waiting in them.
    if agree_outcome(outcome)[0] != OK:
      return outcome, detail, None
    problem = _verify(restored.state, getattr(restored, DIGEST_ITEM) if has_digest else None)
    return (CORRUPT, problem, None) if problem else (OK, "", restored)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
