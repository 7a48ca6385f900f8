"""Device mesh and logical-axis sharding rules.

Model code names axes logically (`embed`, `mlp`, `q_heads`, `activation_batch`, ...); the config maps
those names to the mesh axes `data`, `fsdp` and `tensor`. Changing the parallelism of a run is a config
edit, never a model edit. A dimension that a rule would split unevenly is replicated instead (tiny
models have 2 kv heads; a pod may have 4-way tensor parallelism).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
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
