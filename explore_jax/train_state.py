"""The train state: one pytree, built from shapes, sharded by logical axes, checkpointed whole.

    TrainState(step, rng, actor, actor_opt, critic, critic_opt)

`critic`/`critic_opt` are None for GRPO. The data-iterator state (a small JSON dict) is saved in the
same orbax checkpoint step as a second item, so a checkpoint is complete by construction.
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
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, PartitionSpec as P

from explore_jax import sharding
from explore_jax.models import qwen2

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
  rng = jax.random.PRNGKey(0)
  actor = qwen2.param_shapes(model_cfg)
  actor_specs = qwen2.logical_axes(model_cfg)
  opt_specs = lambda tx, shapes, specs: optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, shapes), specs,
      transform_non_params=lambda _: P(), is_leaf=_is_spec)
  shapes = dict(step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.eval_shape(lambda: rng),
                actor=actor, actor_opt=jax.eval_shape(actor_tx.init, actor))
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


class Checkpointer:
  """Orbax CheckpointManager over (state pytree, data-iterator JSON), robust to torn directories."""

  def __init__(self, directory: str, keep: int):
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory) if "://" not in directory else directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True))

  def save(self, step: int, state: TrainState, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore_latest(self, abstract: TrainState) -> tuple[TrainState, dict] | None:
    """The newest step that restores completely; None (fresh start) when there is none.

    A step whose parameters are laid out otherwise than `abstract`'s (stacked by scan_layers or
    one entry per layer) is not torn: that raises, rather than falling back to an older step or a
    fresh start."""
    want = qwen2.params_layout(abstract.actor)
    for step in sorted(self.manager.all_steps(), reverse=True):
      saved = saved_layout(os.path.join(self.directory, str(step), "state"))
      if saved is not None and saved != want:
        raise ValueError(
            f"{self.directory}/{step}: the checkpoint's parameters are {saved} "
            f"(model.scan_layers={saved == 'stacked'}) but this config has "
            f"model.scan_layers={want == 'stacked'}; set it to match the run, or start a fresh "
            "workdir (`python -m explore_jax.convert restack` converts model checkpoints)")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      except Exception as e:  # a torn or foreign directory: set it aside, try the one before
        torn = os.path.join(self.directory, f"torn_{step}_{int(time.time())}")
        logging.warning("checkpoint step %d in %s is incomplete or unreadable (%s: %s); moved it "
                        "to %s and trying an older one", step, self.directory, type(e).__name__,
                        str(e)[:200], torn)
        if "://" not in self.directory:
          os.rename(os.path.join(self.directory, str(step)), torn)
          self.manager.reload()
        continue
      logging.info("restored checkpoint step %d from %s", step, self.directory)
      return restored.state, dict(restored.data)
    logging.info("no complete checkpoint in %s: starting fresh", self.directory)
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
