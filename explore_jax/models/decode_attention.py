"""Ragged decode attention: each row of a KV cache reads only the key blocks it has filled.

Letters as in `qwen2` and `attention`: B rows, N query heads, K kv heads, G = N / K, H head dim,
S cache slots. A decode step has one query per row, in slot `index[b]`; the row's keys are slots
0 .. index[b] whose `key_mask` is set. The dense decode (`attention.dense`) reads all S slots of
every row; the rollout engine's rows sit at very different positions (a refilled row starts over
while its neighbour is thousands of tokens in), so most of that read is of empty slots.

Here the filled part of every row is cut into blocks of `block` slots, and the blocks of all rows
are laid out in one flat list of at most `blocks` entries (a static bound the caller computes from
the rows' lengths; padding entries are dropped):

    row b owns entries start[b] .. start[b] + ceil((index[b] + 1) / block) - 1
    entry f reads slots j * block .. (j + 1) * block - 1 of its row (j = f - start[row])

Each entry gives a partial softmax (its max, its sum of exponentials, its weighted values) and the
partials of a row are combined exactly (segment max, then rescaled segment sums), as a flash
attention combines its key blocks. The KV read is the gather of those entries: the filled blocks,
not the whole cache. On a mesh the rows and kv heads are split as the cache is (`Ragged.spec`)
and each device runs the same on its own rows in a `shard_map`; `blocks` is then the bound for the
fullest device. The jax repository's Pallas ragged paged attention kernel (TPU) does the same from
a page table; this one is pure JAX and runs anywhere.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

Array = jax.Array

_NEG = -0.7 * float(np.finfo(np.float32).max)  # masked score: exp(_NEG - m) == 0, no inf - inf


@dataclasses.dataclass(frozen=True)
class Ragged:
  """How a decode step reads its cache (static: it sets shapes). `blocks`: flat block entries
  (per device on a mesh), `block`: slots per block; `mesh` and `spec` (the cache's
  PartitionSpec [B, K, S, H]) when the cache is sharded."""
  blocks: int
  block: int
  mesh: Mesh | None = None
  spec: PartitionSpec | None = None

  @property
  def shards(self) -> int:
    """Devices the rows are split over (contiguous equal shares: `blocks_needed`'s shards)."""
    if self.mesh is None or self.spec is None or self.spec[0] is None:
      return 1
    axes = self.spec[0] if isinstance(self.spec[0], tuple) else (self.spec[0],)
    return int(np.prod([self.mesh.shape[a] for a in axes]))


def blocks_needed(lengths, block: int, shards: int = 1) -> int:
  """The flat entries rows of `lengths` filled slots need (host side): on `shards` devices
  holding contiguous equal shares of the rows, those of the fullest device."""
  per_row = -(-np.maximum(np.asarray(lengths, np.int64), 1) // block)
  return int(per_row.reshape(shards, -1).sum(axis=1).max())


def fits(query_slot: Array, ragged: Ragged) -> Array:
  """Whether a step whose rows query slots `query_slot` [B] reads at most `ragged.blocks` flat
  entries on every device (on device: `blocks_needed` of query_slot + 1)."""
  count = -(-(query_slot + 1) // ragged.block)
  return jnp.max(jnp.sum(count.reshape(ragged.shards, -1), axis=1)) <= ragged.blocks


def _local(q: Array, k: Array, v: Array, key_mask: Array, query_slot: Array, blocks: int,
           block: int) -> Array:
  """q [B, N, H], k and v [B, K, S, H], key_mask [B, S], query_slot [B] -> [B, N, H]."""
  b, n, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  g = n // kh
  count = -(-(query_slot + 1) // block)  # [B] blocks of each row
  ends = jnp.cumsum(count)
  entry = jnp.arange(blocks)
  row = jnp.searchsorted(ends, entry, side="right")  # [F]; B for padding entries
  valid = row < b
  row = jnp.minimum(row, b - 1)
  j = entry - (ends[row] - count[row])
  if s % block == 0:
    # Whole blocks of the slot axis cut into [S / block, block]: a gather by block index. (A slot
    # offset the compiler cannot prove aligned made XLA:TPU lay every layer's cache out anew at
    # every step, a copy of the whole cache.)
    jb = jnp.minimum(j, s // block - 1)  # padding entries: any block (masked out below)
    first = jb * block
    grid = lambda x: x.reshape(b, kh, s // block, block, h)[row, :, jb]  # [F, K, block, H]
    kb, vb = grid(k), grid(v)
    mask_b = key_mask.reshape(b, s // block, block)[row, jb]
  else:
    # dynamic_slice keeps a block inside the cache: the last block of a row may start earlier
    # than j * block; the slots it repeats from the block before are masked out below.
    first = jnp.minimum(j * block, s - block)
    take = lambda x, r, f: jax.lax.dynamic_slice(x, (r, 0, f, 0), (1, kh, block, h))[0]
    kb = jax.vmap(take, in_axes=(None, 0, 0))(k, row, first)  # [F, K, block, H]
    vb = jax.vmap(take, in_axes=(None, 0, 0))(v, row, first)
    mask_b = jax.vmap(lambda r, f: jax.lax.dynamic_slice(key_mask, (r, f), (1, block))[0])(
        row, first)
  slots = first[:, None] + jnp.arange(block)  # [F, block]
  allowed = (mask_b & (slots >= j[:, None] * block) & (slots <= query_slot[row][:, None])
             & valid[:, None])
  qf = q[row].reshape(blocks, kh, g, h)
  scores = jnp.einsum("FKGH,FKSH->FKGS", qf, kb, preferred_element_type=jnp.float32)
  scores = jnp.where(allowed[:, None, None], scores / jnp.sqrt(jnp.float32(h)), _NEG)
  m = jnp.max(scores, axis=-1)  # [F, K, G]
  p = jnp.exp(scores - m[..., None])
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("FKGS,FKSH->FKGH", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
  # An entry with nothing allowed (padding, or a block of left padding) has m = _NEG: its weight
  # below is 0 wherever the row has a real key.
  seg = jnp.where(valid, row, b)  # padding entries go to a segment that is dropped
  row_max = jax.ops.segment_max(m, seg, num_segments=b + 1)[:b]
  w = jnp.exp(m - row_max[row])
  l_row = jax.ops.segment_sum(l * w, seg, num_segments=b + 1)[:b]
  o_row = jax.ops.segment_sum(o * w[..., None], seg, num_segments=b + 1)[:b]
  out = o_row / jnp.maximum(l_row, jnp.finfo(jnp.float32).tiny)[..., None]
  return out.reshape(b, n, h).astype(q.dtype)


def attend(q: Array, k: Array, v: Array, key_mask: Array, query_slots: Array,
           ragged: Ragged) -> Array:
  """The decode step's attention: q [B, 1, N, H], k and v [B, K, S, H], key_mask [B, S],
  query_slots [B, 1] (each row's slot) -> [B, 1, N, H], as `attention.dense` gives it."""
  if q.shape[1] != 1:
    raise ValueError(f"ragged decode attention takes one query per row, got {q.shape[1]}")
  block = min(ragged.block, k.shape[2])
  fn = lambda q, k, v, m, i: _local(q, k, v, m, i, ragged.blocks, block)
  if ragged.mesh is not None and ragged.mesh.size > 1:
    batch, heads = ragged.spec[0], ragged.spec[1]
    fn = jax.shard_map(fn, mesh=ragged.mesh, in_specs=(
        PartitionSpec(batch, heads, None), PartitionSpec(batch, heads, None, None),
        PartitionSpec(batch, heads, None, None), PartitionSpec(batch, None), PartitionSpec(batch)),
        out_specs=PartitionSpec(batch, heads, None), check_vma=False)
  return fn(q[:, 0], k, v, key_mask, query_slots[:, 0])[:, None]
