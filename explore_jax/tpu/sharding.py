"""Device mesh and logical-axis sharding rules.

Model code names axes logically (`embed`, `mlp`, `q_heads`, `activation_batch`, ...); the config maps
those names to the mesh axes `data`, `fsdp` and `tensor`. Changing the parallelism of a run is a config
edit, never a model edit. A dimension that a rule would split unevenly is replicated instead (tiny
models have 2 kv heads; a pod may have 4-way tensor parallelism).
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from explore_jax.config.cli import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters are split over `fsdp` (their `embed` dimension) and `tensor`
# (heads, MLP width, vocabulary); the batch of activations, rollouts and caches over `data` x `fsdp`.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the stacked layer axis of scan_layers: every device holds every layer
)


def with_default_rules(extra: Sequence[Sequence[Any]] = ()) -> tuple[tuple[str, Any], ...]:
  """A config's `mesh.rules` (taking precedence) followed by DEFAULT_RULES."""
  return tuple(tuple(r) for r in extra) + DEFAULT_RULES


def initialize_distributed(dist) -> None:
  """Multi-controller start-up from a config's `distributed` block (`defaults.distributed_config`):
  an explicit coordinator, TPU-pod auto-detection ("auto"), or nothing (one process)."""
  if dist.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  if dist.coordinator == "auto":
    jax.distributed.initialize()
  elif dist.coordinator:
    jax.distributed.initialize(coordinator_address=dist.coordinator,
                               num_processes=dist.num_processes, process_id=dist.process_id)


def to_host(x) -> np.ndarray:
  """The whole value of a (possibly multi-host) array as numpy; every process must call it."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def from_main(x: np.ndarray) -> np.ndarray:
  """Process 0's value of x (same shape and dtype everywhere) on every process."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


def gather_ints(values) -> np.ndarray:
  """[processes, len(values)] int32: every process's `values` on every process."""
  mine = np.asarray(values, np.int32).reshape(1, -1)
  if jax.process_count() == 1:
    return mine
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)


def steps_from_main(steps) -> list[int]:
  """Process 0's list of ints on every process (the lists may differ in length)."""
  if jax.process_count() == 1:
    return list(steps)
  n = int(from_main(np.array([len(steps)], np.int32))[0])
  mine = np.zeros((n,), np.int32)
  if jax.process_index() == 0:
    mine[:] = steps
  return [int(s) for s in from_main(mine)]


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def raise_together(error: Exception | None, what: str) -> None:
  """Raise on every process if process 0 hit `error` (None: it did not), instead of leaving the
  others to wait for it in their next collective."""
  failed = from_main(np.array([error is not None], np.int32))[0]
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(f"{what} failed on process 0 (its log says why); stopping here too")


def on_main(fn, what: str):
  """fn() on process 0 alone; its result there, None elsewhere. If it raises, every process
  raises (`raise_together`)."""
  result = error = None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # re-raised by raise_together, once the others know
      error = e
  raise_together(error, what)
  return result


def check_same_on_every_host(what: str, value: str) -> None:
  """Raise on every process if the processes disagree on `value` (e.g. a digest of files each
  host reads from its own disk)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  mine = np.array([zlib.crc32(value.encode()) & 0x7FFFFFFF], np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
  differ = np.nonzero(every != every[0])[0]
  if differ.size:
    raise ValueError(f"{what} differs between hosts: processes {differ.tolist()} disagree with "
                     "process 0; give every host the same files")


class MeshError(UserError, ValueError):
  """A mesh shape that the devices present cannot take."""


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None,
              what: str = "mesh shape") -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices. `what`
  names where the shape comes from in errors (the CLIs' `--config.mesh.shape`)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  given = f"{what}={tuple(shape)}"
  fix = (f"; set {what} to a (data, fsdp, tensor) shape for {len(devices)} devices, e.g. "
         f"'(1,-1,1)' (every device on fsdp)")
  if len(shape) != len(MESH_AXES):
    raise MeshError(f"{given} must have {len(MESH_AXES)} entries {MESH_AXES}{fix}")
  if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
    raise MeshError(f"{given}: entries are >= 1, at most one of them -1{fix}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise MeshError(f"{given} does not divide the {len(devices)} devices here "
                      f"({devices[0].platform}){fix}")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise MeshError(f"{given} needs {int(np.prod(shape))} devices, there are {len(devices)}{fix}")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes from dimensions they would not divide evenly."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for name in names:
      size = mesh.shape[name] * int(np.prod([mesh.shape[k] for k in kept]))
      if dim % size == 0:
        kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def logical_to_mesh(logical: Any, shapes: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Logical PartitionSpecs (a pytree, e.g. `qwen2.logical_axes(cfg)`) -> NamedShardings.

  `shapes` is a matching pytree of arrays or ShapeDtypeStructs, used to replicate dimensions that
  a rule would split unevenly.
  """
  mesh_specs = nn.logical_to_mesh(logical, rules)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, shapes,
      is_leaf=lambda x: isinstance(x, P))


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules=DEFAULT_RULES) -> NamedSharding:
  """The sharding of one array from its logical axis names."""
  spec = nn.logical_to_mesh(P(*names), rules)
  return NamedSharding(mesh, _fit(spec, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
