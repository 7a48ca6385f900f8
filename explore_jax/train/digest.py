"""A digest of every array of a checkpoint, so that a restore knows it read what was saved.

Orbax reads back whatever bytes a checkpoint's data files hold: bytes flipped on a disk or in a
bucket restore without an error, as NaN in an AdamW moment or as quietly wrong weights. So each
save records, beside the state, a 64-bit digest of each array, and each restore recomputes the
digests of what it read (and checks that every float array is finite); a difference sets the step
aside (`train.state.Checkpointer`).

The digest is computed on the devices, where the arrays are, and does not depend on how they are
laid out: a restore may run on another mesh, another sharding, another number of processes.
Element i (its global row-major index) with bit pattern b contributes
h_i = fmix32(b + i * 0x9E3779B9), and the digest is two sums modulo 2^32: sum_i h_i and
sum_i h_i * (2i + 1). A sum of integers modulo 2^32 is exact in any order, so every split of the
array gives the same value. For a fixed index, h_i is a bijection of the bits (an addition, then
murmur3's 32-bit finaliser), so changing any one element always changes its term, and so the
first sum: a flipped byte cannot go unseen. Moving an element to another index changes its term
through the index. Several changed elements cancel in both sums only by chance, about one time
in 2^63 (the second sum weighs each term by an odd multiplier of its own).

Cost: one read of every array (about 15 integer operations per element, fused into the two
reductions), one small program per distinct array shape; `benchmarks/checkpoint_digest.py`
compares it with the save itself (docs/reliability.md has the figures).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_GOLDEN = 0x9E3779B9  # odd: i * _GOLDEN spreads consecutive indices over the 32 bits


def _fmix32(h: Array) -> Array:
  """murmur3's finaliser: a bijection of uint32 that mixes every input bit into every output bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _bits(x: Array) -> Array:
  """The elements' bit patterns as uint32, [*shape] (8-byte types: [*shape, 2])."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _global_index(shape: tuple[int, ...]) -> Array:
  """Each element's row-major index (mod 2^32) over the whole array, whatever its sharding."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
    stride *= shape[dim]
  return index


def _leaf(x: Array) -> tuple[Array, Array]:
  """(uint32[2] digest, finite) of one array."""
  bits = _bits(x)
  index = _global_index(bits.shape)
  term = _fmix32(bits + index * jnp.uint32(_GOLDEN))
  lanes = [jnp.sum(term, dtype=jnp.uint32),
           jnp.sum(term * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)]
  finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.bool_(True))
  return jnp.stack(lanes), finite


# One program per distinct (shape, dtype, sharding): a model's layers share a handful, so this
# compiles far less than one program over every array would.
_leaf_jit = jax.jit(_leaf)


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def names(tree) -> list[str]:
  """Each array's path in `tree`, in leaf order, as "actor/model/embed_tokens": the same for a
  TrainState's field and a dict's key of that name (the export reads the actor alone)."""
  return ["/".join(_key(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def compute(tree) -> tuple[dict[str, str], list[str]]:
  """({path (`names`): 16 hex digits} for every array of `tree`, [paths of float arrays holding a
  non-finite value]). Every process of a job calls it (a collective over sharded arrays)."""
  # One array at a time, each read back before the next is dispatched: on several processes
  # each program is a collective, and independent programs in flight at once may run in a
  # different order on each process (CPU collectives deadlocked so).
  out = [jax.device_get(_leaf_jit(x)) for x in jax.tree.leaves(tree)]
  paths = names(tree)
  hexes = {p: f"{int(d[0]):08x}{int(d[1]):08x}" for p, (d, _) in zip(paths, out)}
  return hexes, [p for p, (_, ok) in zip(paths, out) if not ok]


def differences(saved: dict[str, str], read: dict[str, str]) -> list[str]:
  """Paths whose digest differs between a save's record and what a restore read (an array
  the record lacks counts as differing)."""
  return [p for p in read if saved.get(p) != read[p]]
