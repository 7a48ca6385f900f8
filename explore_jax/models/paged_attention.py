"""Paged decode attention: a row's keys and values live in fixed-size pages found through a table.

Letters as in `qwen2`: S decode slots (rows), N query heads, K kv heads, G = N / K, H head dim;
plus NP pages in the pool, PS positions per page, W table entries per slot.

The paged rollout engine (`explore_jax.rollout.paged`) keeps one pool of pages per layer, k and
v each [K, NP, PS, H] (the layout of the Pallas kernels that ship with JAX), and a page table
[S, W]: position j of slot s's row is at offset j % PS of page table[s, j // PS]. A row holds only
the pages it has filled, so a pool of the bytes of a few full-length rows holds many rows of
RL-like (long-tailed) lengths. Positions are the row's own: its first prompt token sits at 0 (no
left padding in a page), so a row's keys are exactly positions 0 .. length - 1 and no key mask is
needed.

One decode step per layer (`decode_layer`): write the step's key and value at position
`lengths[s]` of every live slot, then attend over positions 0 .. lengths[s]. The read goes by
platform (`PagedRead.kernel`):

  pallas_tpu  jax.experimental.pallas.ops.tpu.paged_attention: each live row's pages in blocks of
              `block` pages (an idle slot, length 0, reads nothing). It applies no 1/sqrt(H)
              (q is scaled first) and reads K/V as bfloat16.
  pallas_gpu  jax.experimental.pallas.ops.gpu.paged_attention (Triton): the same reads.
  native_cpu  a native CPU kernel through jax.ffi (`cpu_paged_attention`): each row's table
              walked in place, exactly the positions it holds; built on first use.
  gather      pure JAX, any platform (the reference): the live rows' pages laid out in one flat
              list of (row, page) entries, each a partial softmax combined per row exactly as a
              flash attention combines its key blocks. The list has a static size: the smallest
              power of two (from 16, up to `entries`) that holds the rows' pages, picked per step
              among compiled sizes (`entry_levels`); it reads that many pages.

On a mesh the pool's page axis is split like the slots (each device holds the pages of its own
slots: table entries are page ids local to that share) and kv heads over `tensor`; the write and
the read run per device in a `shard_map`, so no page crosses devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

Array = jax.Array
_NEG = -0.7 * float(np.finfo(np.float32).max)  # masked score: exp(_NEG - m) == 0, no inf - inf

KERNELS = ("gather", "native_cpu", "pallas_tpu", "pallas_gpu")
_GPU_SPLITS = 8  # the GPU kernel's k_splits: the table width is a multiple of 8 x block


@dataclasses.dataclass(frozen=True)
class PagedRead:
  """How a decode step reads the pages (static: it sets shapes). kernel: one of KERNELS; block:
  pages per kernel block (the TPU kernel's `pages_per_compute_block`); entries: the gather's
  flat (row, page) entries per device. mesh, batch (the mesh axes of the slots and of the pool's
  page axis) and heads (the mesh axis of the kv heads) when the pool is sharded."""
  kernel: str
  block: int = 1
  entries: int = 0
  mesh: Mesh | None = None
  batch: Any = None
  heads: Any = None

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"paged attention kernel={self.kernel!r}: use one of {KERNELS}")
    if self.block < 1:
      raise ValueError(f"paged attention block={self.block}: must be >= 1 page")

  @property
  def width_multiple(self) -> int:
    """What the table width W must be a multiple of, for the kernel."""
    return {"gather": 1, "native_cpu": 1, "pallas_tpu": self.block,
            "pallas_gpu": self.block * _GPU_SPLITS}[self.kernel]

  @property
  def on_cpu_cores(self) -> bool:
    """Whether the read runs as ordinary XLA or host code (the gather, the native CPU kernel),
    where a decode step costs about as much per slot as per position read."""
    return self.kernel in ("gather", "native_cpu")


def table_width(positions: int, page_size: int, read: PagedRead) -> int:
  """Table entries per slot for rows of up to `positions` positions."""
  pages = -(-positions // page_size)
  return -(-pages // read.width_multiple) * read.width_multiple


@flax.struct.dataclass
class PagedCache:
  """What the model's decode step reads and writes (`qwen2.Attention`)."""
  k: tuple[Array, ...]  # per layer [K, NP, PS, H]
  v: tuple[Array, ...]  # per layer [K, NP, PS, H]
  table: Array  # [S, W] int32 page ids (local to the slot's device's share of the pool)
  lengths: Array  # [S] int32 positions the row holds: the step writes and queries this position
  live: Array  # [S] bool: idle slots write nothing and read nothing
  read: PagedRead = flax.struct.field(pytree_node=False, default=PagedRead("gather"))


def kernel_reads(lengths: Array, live: Array, page_size: int, block: int) -> Array:
  """KV positions the Pallas kernels read in a step whose rows attend `lengths` [S] positions:
  each live row's pages rounded up to whole blocks of `block` pages."""
  per = page_size * block
  return jnp.where(live, -(-lengths // per) * per, 0)


def entry_levels(entries: int) -> tuple[int, ...]:
  """The gather's static sizes up to `entries`: powers of two from 16, then `entries`."""
  levels = [e for e in (16 << i for i in range(32)) if e < entries]
  return tuple(levels) + (entries,)


def _gather(q, kp, vp, table, reads, entries: int):
  """q [S, N, H], kp and vp [K, NP, PS, H], table [S, W], reads [S] (0: idle) -> [S, N, H],
  over a flat list of `entries` (row, page) pairs (at least the rows' pages)."""
  s, n, h = q.shape
  kh, ps = kp.shape[0], kp.shape[2]
  count = -(-reads // ps)  # [S] pages of each row
  ends = jnp.cumsum(count)
  entry = jnp.arange(entries)
  row = jnp.searchsorted(ends, entry, side="right")  # [E]; S for padding entries
  valid = row < s
  row = jnp.minimum(row, s - 1)
  j = entry - (ends[row] - count[row])  # the entry's page within its row
  page = jnp.clip(table[row, jnp.clip(j, 0, table.shape[1] - 1)], 0, kp.shape[1] - 1)
  kb, vb = kp[:, page], vp[:, page]  # [K, E, PS, H]; a padding entry reads some page, masked
  allowed = (j[:, None] * ps + jnp.arange(ps) < reads[row][:, None]) & valid[:, None]  # [E, PS]
  qf = q[row].reshape(entries, kh, n // kh, h).swapaxes(0, 1).astype(jnp.float32)  # [K, E, G, H]
  # Products and sums rather than a batched matmul of [G, H] x [H, PS] per entry: on CPU the
  # tiny matmuls ran about 1.5x slower than this fused multiply-and-reduce.
  scores = jnp.sum(qf[:, :, :, None] * kb[:, :, None].astype(jnp.float32), axis=-1)  # [K,E,G,PS]
  scores = jnp.where(allowed[None, :, None], scores / jnp.sqrt(jnp.float32(h)), _NEG)
  m = jnp.max(scores, axis=-1)  # [K, E, G]
  p = jnp.exp(scores - m[..., None])
  o = jnp.sum(p[..., None] * vb[:, :, None].astype(jnp.float32), axis=-2)  # [K, E, G, H]
  # Each entry's partial softmax is combined per row exactly, as a flash attention combines its
  # key blocks; an entry with nothing allowed (padding) has m = _NEG: weight 0 in its row.
  seg = jnp.where(valid, row, s)  # padding entries go to a segment that is dropped
  per_row = lambda x, op: op(x.swapaxes(0, 1), seg, num_segments=s + 1)[:s]  # [S, K, ...]
  row_max = per_row(m, jax.ops.segment_max)  # [S, K, G]
  w = jnp.exp(m - row_max[row].swapaxes(0, 1))
  l_row = per_row(jnp.sum(p, axis=-1) * w, jax.ops.segment_sum)
  o_row = per_row(o * w[..., None], jax.ops.segment_sum)  # [S, K, G, H]
  out = o_row / jnp.maximum(l_row, jnp.finfo(jnp.float32).tiny)[..., None]
  return out.reshape(s, n, h).astype(q.dtype)


def _level(need: Array, entries: int) -> Array:
  """The index of the smallest of `entry_levels(entries)` that holds `need` entries."""
  levels = entry_levels(entries)
  return jnp.minimum(jnp.searchsorted(jnp.asarray(levels), need), len(levels) - 1)


def gather_read(reads: Array, page_size: int, entries: int) -> Array:
  """KV positions the gather reads on one device whose rows attend `reads` [S] positions."""
  need = jnp.sum(-(-reads // page_size))
  return jnp.asarray(entry_levels(entries))[_level(need, entries)] * page_size


def _gather_levels(q, kp, vp, table, reads, entries: int):
  """The gather at the smallest of `entry_levels(entries)` that holds the rows' pages (one
  compiled program holds every level; a step runs one)."""
  levels = entry_levels(entries)
  if len(levels) == 1:
    return _gather(q, kp, vp, table, reads, entries)
  branch = _level(jnp.sum(-(-reads // kp.shape[2])), entries)
  return jax.lax.switch(branch, [functools.partial(_gather, entries=e) for e in levels],
                        q, kp, vp, table, reads)


def _pallas_tpu(q, kp, vp, table, reads, block: int):
  from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
  scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
  return paged_attention((q * scale).astype(q.dtype), kp, vp, reads, table,
                         pages_per_compute_block=block)


def _pallas_gpu(q, kp, vp, table, reads, block: int):
  from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
  scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
  return paged_attention((q * scale).astype(q.dtype), kp, vp, table, reads,
                         pages_per_compute_block=block, k_splits=_GPU_SPLITS,
                         interpret=jax.default_backend() == "cpu")


def own_read(reads: Array, page_size: int, read: PagedRead) -> Array:
  """KV positions `read`'s kernel reads on one device whose rows attend `reads` [S] positions:
  the gather's size; exactly the positions for the native CPU kernel; the Pallas kernels' whole
  blocks."""
  if read.kernel == "gather":
    return gather_read(reads, page_size, read.entries)
  if read.kernel == "native_cpu":
    return jnp.sum(reads)
  return jnp.sum(kernel_reads(reads, reads > 0, page_size, read.block))


def attend(q: Array, kp: Array, vp: Array, table: Array, reads: Array, read: PagedRead) -> Array:
  """One query per row over its first `reads` [S] positions (0: none), on one device's pages."""
  if read.kernel == "native_cpu":
    from explore_jax.models import cpu_paged_attention
    return cpu_paged_attention.attend(q, kp, vp, table, reads)
  if read.kernel == "pallas_tpu":
    return _pallas_tpu(q, kp, vp, table, reads, read.block)
  if read.kernel == "pallas_gpu":
    return _pallas_gpu(q, kp, vp, table, reads, read.block)
  return _gather_levels(q, kp, vp, table, reads, read.entries)


def _write(kp: Array, x: Array, table: Array, lengths: Array, live: Array) -> Array:
  """Write x [S, K, H] at position lengths[s] of every live slot's row."""
  ps = kp.shape[2]
  page = jnp.take_along_axis(table, (lengths // ps)[:, None], axis=1)[:, 0]
  page = jnp.where(live, page, kp.shape[1])  # idle slots: out of range, dropped
  return kp.at[:, page, lengths % ps].set(x.swapaxes(0, 1).astype(kp.dtype), mode="drop")


def _local_step(q, key, val, kp, vp, table, lengths, live, read: PagedRead):
  kp = _write(kp, key, table, lengths, live)
  vp = _write(vp, val, table, lengths, live)
  reads = jnp.where(live, lengths + 1, 0)
  return attend(q, kp, vp, table, reads, read), kp, vp


def pool_spec(read: PagedRead) -> PartitionSpec:
  return PartitionSpec(read.heads, read.batch, None, None)


def per_device(fn, read: PagedRead, in_specs, out_specs):
  """fn on each device's slots and pages (a shard_map) on a mesh; fn itself without one."""
  if read.mesh is None or read.mesh.size == 1:
    return fn
  return jax.shard_map(fn, mesh=read.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def decode_layer(cache: PagedCache, layer: int, q: Array, key: Array, val: Array
                 ) -> tuple[Array, PagedCache]:
  """The decode step of one layer: q [S, 1, N, H], key and val [S, K, 1, H] (RoPE applied) ->
  attention output [S, 1, N, H] and the cache with the step's keys and values written."""
  if q.shape[1] != 1:
    raise ValueError(f"paged decode attention takes one query per row, got {q.shape[1]}")
  read = cache.read
  rows = PartitionSpec(read.batch)
  heads = PartitionSpec(read.batch, read.heads, None)
  fn = per_device(functools.partial(_local_step, read=read), read,
                  (heads, heads, heads, pool_spec(read), pool_spec(read),
                   PartitionSpec(read.batch, None), rows, rows),
                  (heads, pool_spec(read), pool_spec(read)))
  out, kp, vp = fn(q[:, 0], key[:, :, 0], val[:, :, 0], cache.k[layer], cache.v[layer],
                   cache.table, cache.lengths, cache.live)
  cache = cache.replace(k=(*cache.k[:layer], kp, *cache.k[layer + 1:]),
                        v=(*cache.v[:layer], vp, *cache.v[layer + 1:]))
  return out[:, None], cache
