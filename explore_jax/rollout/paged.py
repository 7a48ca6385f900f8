"""Paged rollouts: a pool of KV pages handed to rows as they grow, refilled on the device.

The continuous engine (`explore_jax.rollout.engine`) gives each of its slots a cache of P + N
positions, reserved for the longest row although RL responses are long-tailed. Here the KV cache
is a pool of NP pages of PS positions per layer (`models/paged_attention.py`); a row holds a
page table and only the pages it has filled, so the same bytes hold several times the rows, and
a decode step (bound by reading weights and KV at scale) decodes that many more.

Pages. A prompt is prefilled once into pages of its own (its real tokens from position 0; the
left padding is dropped) that its n samples share read-only: a row starts with its prompt's full
pages in its table and a copy of the partly filled last one, and takes a fresh page each time it
crosses a page boundary. Each page counts its references (`refs`; 0 = free): a row's pages are
returned when it ends, the prompt's when its last sample ends.

Preemption. A row is admitted to a free slot only while the pool keeps a reserve for the live
rows' growth (RESERVE_STEPS steps of it). When the live rows still need more pages than are free,
the youngest rows (fewest tokens: the least work lost) give theirs back and go back to the queue;
they start again later from their prompt's pages. A row's draws depend only on (rng, prompt,
sample, position) (`sampling.row_keys`), so the restarted row samples the same tokens: preemption
never changes a rollout.

Refill on the device. One jitted `lax.while_loop` (`_decode`) refills free slots from the rows of
the prefilled prompts, allocates pages, preempts, decodes one step of every live slot and
returns finished rows' pages, step after step. It returns to the host only when a shard has no
prefilled row left to start and the pool has room for the next batch of prompts (the host then
prefills it: `_prefill`), when the gather's bound must change (below), or when every row is done.
Every decision is a function of replicated device state, so every process makes the same ones.

Shards. On a mesh the slots, the pages and the output rows are split over the batch axes into G
shards; shard g owns prompts g*B/G .. (g+1)*B/G - 1 (the rows its devices hold in the output),
its slots and its pages, and schedules them alone: the bookkeeping below is written for one shard
and vmapped over G (it is small and replicated); the pages themselves are written and read per
device (`paged_attention.per_device`).

Attention by platform (`paged_attention.PagedRead`): the Pallas TPU kernel on TPU, the pure-JAX
gather elsewhere (the Pallas GPU kernel on request). The gather reads a static number of
(row, page) entries: every page of the pool plus the shared prompt pages while rows are pending,
a smaller bucket once none is (the loop returns when the rows' pages outgrow it, or shrink to a
quarter of it). Stats count what the kernels read (each live row's pages rounded up to whole
blocks) and, beside it, what the gather read.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from explore_jax.models import paged_attention, qwen2
from explore_jax.models.paged_attention import PagedCache, PagedRead
from explore_jax.models.qwen2 import Params, Qwen2Config
from explore_jax.rollout import sampling
from explore_jax.tpu import sharding

Array = jax.Array

PAGE_SIZE = 16  # positions per page (generate's default)
PAGE_BLOCK = 2  # pages per block of the Pallas kernels' reads
# A row is admitted only while the free pages cover the live rows' growth for this many steps
# (live rows / page size pages per step): fewer preemptions right after a refill.
RESERVE_STEPS = 4
# Once no row waits, the gather's device calls decode the live rows in the fewest slots (a power
# of two) that hold them, but no fewer than this: on CPU a step's cost follows its slots.
MIN_SLOTS = 8
WAITING, RUNNING, DONE = 0, 1, 2  # a row's status


@dataclasses.dataclass(frozen=True)
class Plan:
  """The engine's static shape (hashable: a static jit argument)."""
  shards: int  # G
  slots: int  # per shard
  pages: int  # NPl, per shard
  page_size: int  # PS
  width: int  # W: table entries per slot
  prompt_width: int  # P: the prompts' (padded) width
  prompt_pages: int  # Wp = ceil(P / PS)
  max_new_tokens: int  # N
  n: int
  prompts: int  # Bl, per shard
  batch: int  # Fb: prompts per shard per prefill
  min_slots: int  # the gather's drain decodes in no fewer slots (MIN_SLOTS)
  read: PagedRead  # entries: the gather's largest bound (`max_entries`)

  @property
  def rows(self) -> int:
    return self.prompts * self.n

  @property
  def max_entries(self) -> int:
    """Flat (row, page) entries a gather can need: the slots' own pages fit the pool; their
    shared prompt pages come on top."""
    return self.pages + self.slots * (self.prompt_width // self.page_size)


def row_pages(prompt_width: int, max_new_tokens: int, page_size: int) -> int:
  """Pages of a row at full length (its prompt's P and N - 1 response positions written)."""
  return -(-(prompt_width + max_new_tokens) // page_size)


def kernel_for(platform: str, name: str = "auto") -> str:
  """The paged attention kernel: `auto` is the Pallas kernel on TPU and the gather elsewhere (on
  a GPU the Pallas kernel is taken when named, until measured to beat the gather there)."""
  if name == "auto":
    return "pallas_tpu" if platform == "tpu" else "gather"
  if name not in paged_attention.KERNELS:
    raise ValueError(f"page_attention={name!r}: use 'auto' or one of {paged_attention.KERNELS}")
  return name


def check_config(rollout, prefix: str = "config.rollout.") -> None:
  """A config's paged-engine keys (`defaults.base_config`'s rollout section, or the evaluator's),
  checked before any work: a clear error naming the key."""
  if rollout.kv_pages < 0:
    raise ValueError(f"{prefix}kv_pages={rollout.kv_pages}: must be >= 0 (0: room for every "
                     "slot's full row)")
  for key in ("page_size", "page_block"):
    if getattr(rollout, key) < 1:
      raise ValueError(f"{prefix}{key}={getattr(rollout, key)}: must be >= 1")
  if rollout.page_attention != "auto" and rollout.page_attention not in paged_attention.KERNELS:
    raise ValueError(f"{prefix}page_attention={rollout.page_attention!r}: use 'auto' or one of "
                     f"{paged_attention.KERNELS}")


def batch_axes(mesh: Mesh | None, rows: int):
  """(mesh axes the rows are split over, shards): `sharding`'s rule for the logical batch axis."""
  if mesh is None:
    return None, 1
  spec = sharding.logical_sharding(("batch",), (rows,), mesh).spec
  axes = spec[0] if spec else None
  names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
  return axes, int(np.prod([mesh.shape[a] for a in names]))


def make_plan(config: Qwen2Config, prompts: int, prompt_width: int, *, max_new_tokens: int, n: int,
              slots: int, kv_pages: int, page_size: int, page_block: int, kernel: str,
              mesh: Mesh | None) -> Plan:
  """The plan of a rollout of `prompts` prompts [prompts, prompt_width]; checks the arguments."""
  rows = prompts * n
  slots = slots or rows
  if page_size < 1 or page_block < 1 or kv_pages < 0 or slots < 1:
    raise ValueError(f"paged engine: page_size={page_size}, page_block={page_block} and "
                     f"slots={slots} must be >= 1, kv_pages={kv_pages} >= 0")
  axes, shards = batch_axes(mesh, rows)
  if prompts % shards or slots % shards or kv_pages % shards:
    raise ValueError(f"paged engine: prompts ({prompts}), slots ({slots}) and kv_pages "
                     f"({kv_pages}) must be multiples of the {shards} batch shards of the mesh")
  heads = None
  if mesh is not None:
    shape = (config.num_key_value_heads, 8 * shards, page_size, config.head_dim)
    heads = sharding.logical_sharding(("kv_heads", "cache_batch", None, None), shape, mesh).spec[0]
  read = PagedRead(kernel, page_block, 0, mesh, axes, heads)
  width = paged_attention.table_width(prompt_width + max_new_tokens, page_size, read)
  local_slots, local_prompts = slots // shards, prompts // shards
  batch = min(local_prompts, -(-local_slots // n))
  wp = -(-prompt_width // page_size)
  full_row = row_pages(prompt_width, max_new_tokens, page_size)
  # Every page a shard can hold at once (each slot's full row and the prompts' pages): no row is
  # ever preempted.
  pages = kv_pages // shards or local_slots * full_row + min(local_prompts, local_slots + batch) * wp
  # A row at full length must fit beside the prompts that hold pages (those of the live rows and
  # of a prefill batch): then the oldest row always finishes.
  least = full_row + min(local_prompts, local_slots + batch) * wp
  if pages < least:
    raise ValueError(f"paged engine: kv_pages={kv_pages} gives {pages} pages per batch shard; "
                     f"at least {least} are needed (a full row of {full_row} pages beside the "
                     f"prompt pages of up to {min(local_prompts, local_slots + batch)} prompts)")
  plan = Plan(shards, local_slots, pages, page_size, width, prompt_width, wp, max_new_tokens, n,
              local_prompts, batch, MIN_SLOTS, read)
  return dataclasses.replace(plan, read=dataclasses.replace(read, entries=plan.max_entries))


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Book:
  """One shard's bookkeeping (the engine holds [G, ...] of each field, replicated)."""
  refs: Array  # [NPl] int32: references to each page (0: free)
  table: Array  # [Sl, W] int32: each slot's pages (NPl: none)
  lengths: Array  # [Sl] int32: positions its row holds (the next step writes this one)
  shared: Array  # [Sl] int32: the table's first pages are its prompt's (shared, read-only)
  last: Array  # [Sl] int32: the row's last sampled token (the next step's input)
  t: Array  # [Sl] int32: tokens the row has sampled
  row: Array  # [Sl] int32: the shard's row the slot decodes
  active: Array  # [Sl] bool
  status: Array  # [Rl] int32: WAITING, RUNNING, DONE
  first: Array  # [Rl] int32: the row's first token (sampled at its prompt's prefill)
  prompt_len: Array  # [Bl] int32: real tokens of each prompt
  prompt_pages: Array  # [Bl, Wp] int32: the prefilled prompt's pages (NPl: none)
  prompt_left: Array  # [Bl] int32: samples not finished (its pages are returned at 0)
  prefilled: Array  # [] int32: prompts 0 .. prefilled - 1 of the shard are prefilled


@flax.struct.dataclass
class Counters:
  """What one device call did (the host adds them up)."""
  steps: Array  # decode steps
  busy: Array  # live slot-steps
  kernel_read: Array  # f32 KV positions the Pallas kernels read
  gather_read: Array  # f32 KV positions the gather read
  filled: Array  # f32 KV positions the live rows attended
  preempted: Array  # rows preempted
  peak: Array  # most pages in use at once (all shards)
  overflow: Array  # a step found no page for a live row (a bug: the host raises)


@flax.struct.dataclass
class PagedState:
  k: tuple[Array, ...]  # per layer [K, G * NPl, PS, H]
  v: tuple[Array, ...]
  book: Book  # [G, ...]
  keys: Array  # [G, Rl] row keys (`sampling.row_keys`)
  tokens: Array  # [R, N] int32 output buffers, as sampling.Rollout
  logprobs: Array  # [R, N] f32
  entropy: Array  # [R, N] f32
  lengths: Array  # [R] int32
  eos: Array  # [R] bool
  counters: Counters


def _counters() -> Counters:
  z = jnp.zeros((), jnp.int32)
  f = jnp.zeros((), jnp.float32)
  return Counters(z, z, f, f, f, z, z, z)


def _pool_sharding(plan: Plan, shape) -> NamedSharding | None:
  read = plan.read
  if read.mesh is None:
    return None
  return NamedSharding(read.mesh, paged_attention.pool_spec(read))


def _constrain(state: PagedState, plan: Plan) -> PagedState:
  """Pages split like the slots, output rows over the batch axes, bookkeeping replicated."""
  mesh = plan.read.mesh
  if mesh is None:
    return state
  pin = jax.lax.with_sharding_constraint
  pool = _pool_sharding(plan, None)
  rows = lambda x: pin(x, NamedSharding(mesh, PartitionSpec(plan.read.batch,
                                                            *(None,) * (x.ndim - 1))))
  rep = lambda x: pin(x, NamedSharding(mesh, PartitionSpec()))
  return state.replace(
      k=tuple(pin(x, pool) for x in state.k), v=tuple(pin(x, pool) for x in state.v),
      book=jax.tree.map(rep, state.book), keys=rep(state.keys), tokens=rows(state.tokens),
      logprobs=rows(state.logprobs), entropy=rows(state.entropy), lengths=rows(state.lengths),
      eos=rows(state.eos), counters=jax.tree.map(rep, state.counters))


def empty_state(config: Qwen2Config, plan: Plan, keys: Array, prompt_len: Array, eos_id
                ) -> PagedState:
  """An idle engine: every page free, every row waiting, output buffers of eos_id."""
  g, sl, npl = plan.shards, plan.slots, plan.pages
  shape = (config.num_key_value_heads, g * npl, plan.page_size, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  layers = range(config.num_hidden_layers)
  zeros = lambda *s: jnp.zeros((g, *s), jnp.int32)
  book = Book(refs=zeros(npl), table=jnp.full((g, sl, plan.width), npl, jnp.int32),
              lengths=zeros(sl), shared=zeros(sl), last=zeros(sl), t=zeros(sl), row=zeros(sl),
              active=jnp.zeros((g, sl), bool), status=zeros(plan.rows), first=zeros(plan.rows),
              prompt_len=prompt_len.astype(jnp.int32),
              prompt_pages=jnp.full((g, plan.prompts, plan.prompt_pages), npl, jnp.int32),
              prompt_left=jnp.full((g, plan.prompts), plan.n, jnp.int32), prefilled=zeros())
  rows, new = g * plan.rows, plan.max_new_tokens
  return PagedState(
      k=tuple(jnp.zeros(shape, dtype) for _ in layers),
      v=tuple(jnp.zeros(shape, dtype) for _ in layers), book=book, keys=keys,
      tokens=jnp.full((rows, new), eos_id, jnp.int32),
      logprobs=jnp.zeros((rows, new), jnp.float32), entropy=jnp.zeros((rows, new), jnp.float32),
      lengths=jnp.zeros((rows,), jnp.int32), eos=jnp.zeros((rows,), bool), counters=_counters())


@functools.partial(jax.jit, static_argnames=("config", "plan"))
def _start(rng, prompt_index, sample_offset, prompt_len, eos_id, *, config, plan) -> PagedState:
  """The idle engine with every row's key, built in one call."""
  r = plan.shards * plan.rows
  rows = jnp.arange(r)
  keys = sampling.row_keys(rng, prompt_index[rows // plan.n], sample_offset + rows % plan.n)
  # Typed keys [R], or raw uint32 ones [R, 2]: the rows split over the shards either way.
  state = empty_state(config, plan, keys.reshape(plan.shards, plan.rows, *keys.shape[1:]),
                      prompt_len.reshape(plan.shards, plan.prompts), eos_id)
  return _constrain(state, plan)


# --------------------------------------------------------------------------------------------------
# One shard's bookkeeping (vmapped over the shards)
# --------------------------------------------------------------------------------------------------


def _free_list(refs: Array, size: int) -> Array:
  """The first `size` free pages (the pool's size where fewer are free)."""
  return jnp.nonzero(refs == 0, size=size, fill_value=refs.shape[0])[0].astype(jnp.int32)


def _release(b: Book, mask: Array, status: int, plan: Plan) -> Book:
  """Slots `mask` [Sl] give their pages back (a shared prompt page loses one reference) and
  their rows take `status` (WAITING: preempted, DONE: ended)."""
  held = jnp.arange(plan.width)[None] < -(-b.lengths // plan.page_size)[:, None]  # [Sl, W]
  drop = jnp.where(mask[:, None] & held, b.table, plan.pages)
  refs = b.refs.at[drop.ravel()].add(-1, mode="drop")
  status_ = b.status.at[jnp.where(mask, b.row, plan.rows)].set(status, mode="drop")
  return b.replace(refs=refs, status=status_, active=b.active & ~mask,
                   table=jnp.where(mask[:, None], plan.pages, b.table),
                   lengths=jnp.where(mask, 0, b.lengths))


def _ready(b: Book, plan: Plan) -> Array:
  """[Rl] rows waiting whose prompt is prefilled."""
  return (b.status == WAITING) & (jnp.arange(plan.rows) // plan.n < b.prefilled)


def _reserve(b: Book, plan: Plan) -> Array:
  live = jnp.sum(b.active.astype(jnp.int32))
  return -(-live * RESERVE_STEPS // plan.page_size)


def _admit(b: Book, plan: Plan) -> tuple[Book, Array, Array]:
  """Start the first waiting rows of prefilled prompts in free slots, as many as the free pages
  allow beside the live rows' next pages and the reserve. Returns the book, the slots that
  started [Sl] and, for each, the prompt page to copy into its first page of its own (the
  partly filled last one; NPl: none)."""
  ps, sl = plan.page_size, plan.slots
  ready = _ready(b, plan)
  free_pages = jnp.sum((b.refs == 0).astype(jnp.int32))
  live_need = jnp.sum((b.active & (b.lengths % ps == 0)).astype(jnp.int32))
  budget = jnp.maximum(free_pages - live_need - _reserve(b, plan), 0)
  count = jnp.minimum(jnp.minimum(jnp.sum((~b.active).astype(jnp.int32)),
                                  jnp.sum(ready.astype(jnp.int32))), budget)
  take = jnp.arange(sl) < count
  slot = jnp.where(take, jnp.nonzero(~b.active, size=sl, fill_value=sl)[0], sl)  # sl: dropped
  row = jnp.where(take, jnp.nonzero(ready, size=sl, fill_value=0)[0], 0)
  prompt = row // plan.n
  plen = b.prompt_len[prompt]
  full = plen // ps  # the prompt's full pages: shared
  pages = b.prompt_pages[prompt]  # [Sl, Wp]
  shared = jnp.where(take[:, None] & (jnp.arange(plan.prompt_pages)[None] < full[:, None]),
                     pages, plan.pages)
  table = jnp.full((sl, plan.width), plan.pages, jnp.int32).at[:, :plan.prompt_pages].set(shared)
  partial = jnp.take_along_axis(pages, jnp.minimum(full, plan.prompt_pages - 1)[:, None], 1)[:, 0]
  copy = jnp.where(plen % ps != 0, partial, plan.pages)
  put = lambda x, y: x.at[slot].set(y, mode="drop")
  b = b.replace(
      refs=b.refs.at[shared.ravel()].add(1, mode="drop"), table=put(b.table, table),
      lengths=put(b.lengths, plen), shared=put(b.shared, full), last=put(b.last, b.first[row]),
      t=put(b.t, jnp.ones_like(row)), row=put(b.row, row), active=put(b.active, take),
      status=b.status.at[jnp.where(take, row, plan.rows)].set(RUNNING, mode="drop"))
  started = jnp.zeros((sl,), bool).at[slot].set(True, mode="drop")
  return b, started, jnp.full((sl,), plan.pages, jnp.int32).at[slot].set(copy, mode="drop")


def _allocate(b: Book, started: Array, plan: Plan) -> tuple[Book, Array, Array, Array]:
  """A fresh page for every live slot whose step writes the first position of a page (and for
  every row that just started: its copy of the prompt's last page, or a fresh one). When too few
  are free, the youngest running rows are preempted first. Returns the book, each slot's new page
  [Sl] (NPl: none), the preempted slots [Sl] and whether a live slot found no page."""
  ps, sl = plan.page_size, plan.slots
  need = b.active & ((b.lengths % ps == 0) | started)
  deficit = jnp.sum(need.astype(jnp.int32)) - jnp.sum((b.refs == 0).astype(jnp.int32))
  # Preempting a slot frees its own pages and drops its need; started rows are not candidates
  # (`_admit` left pages for them).
  cand = b.active & ~started
  gain = jnp.where(cand, -(-b.lengths // ps) - b.shared + need.astype(jnp.int32), 0)
  order = jnp.argsort(jnp.where(cand, b.t, jnp.iinfo(jnp.int32).max), stable=True)
  before = jnp.cumsum(gain[order]) - gain[order]
  victim = jnp.zeros((sl,), bool).at[order].set(cand[order] & (before < deficit))
  b = _release(b, victim, WAITING, plan)
  need &= ~victim
  rank = jnp.cumsum(need.astype(jnp.int32)) - 1
  page = jnp.where(need, _free_list(b.refs, sl)[jnp.clip(rank, 0, sl - 1)], plan.pages)
  overflow = jnp.any(need & (page >= plan.pages))
  at = b.lengths // ps
  table = b.table.at[jnp.where(need, jnp.arange(sl), sl), at].set(page, mode="drop")
  return b.replace(refs=b.refs.at[page].set(1, mode="drop"), table=table), page, victim, overflow


def _advance(b: Book, token: Array, ended: Array, plan: Plan) -> Book:
  """After a step: live slots took `token` [Sl]; rows `ended` [Sl] are done (their pages go
  back, and their prompt's once its last sample is done)."""
  live = b.active
  b = b.replace(lengths=jnp.where(live, b.lengths + 1, b.lengths),
                t=jnp.where(live, b.t + 1, b.t), last=jnp.where(live, token, b.last))
  left = b.prompt_left.at[jnp.where(ended, b.row // plan.n, plan.prompts)].add(-1, mode="drop")
  b = _release(b, ended, DONE, plan).replace(prompt_left=left)
  return _release_prompts(b, plan)


def _release_prompts(b: Book, plan: Plan) -> Book:
  """Prompts whose samples are all done give their pages back."""
  done = (b.prompt_left == 0) & (b.prompt_pages[:, 0] < plan.pages)
  drop = jnp.where(done[:, None], b.prompt_pages, plan.pages)
  return b.replace(refs=b.refs.at[drop.ravel()].add(-1, mode="drop"),
                   prompt_pages=jnp.where(done[:, None], plan.pages, b.prompt_pages))


def _next_batch_pages(b: Book, plan: Plan) -> Array:
  """Pages the shard's next prefill batch takes."""
  i = b.prefilled + jnp.arange(plan.batch)
  pages = -(-b.prompt_len[jnp.minimum(i, plan.prompts - 1)] // plan.page_size)
  return jnp.sum(jnp.where(i < plan.prompts, pages, 0))


def _wants_prefill(b: Book, plan: Plan) -> Array:
  """The shard has no prefilled row left to start, prompts left, and room for their pages."""
  free = jnp.sum((b.refs == 0).astype(jnp.int32))
  return ((b.prefilled < plan.prompts) & ~jnp.any(_ready(b, plan))
          & (free >= _next_batch_pages(b, plan)))


def _shard_summary(b: Book, plan: Plan) -> Array:
  """[5] what the host schedules from: prefilled, free pages, waiting rows, live slots, whether
  it wants a prefill."""
  return jnp.stack([b.prefilled, jnp.sum((b.refs == 0).astype(jnp.int32)),
                    jnp.sum((b.status == WAITING).astype(jnp.int32)),
                    jnp.sum(b.active.astype(jnp.int32)),
                    _wants_prefill(b, plan).astype(jnp.int32)])


# --------------------------------------------------------------------------------------------------
# Device programs
# --------------------------------------------------------------------------------------------------


def _on_pages(fn, plan: Plan, n_rows_args: int):
  """fn(k, v, *per-shard args) on each device's pages: k and v [K, NPl, PS, H] per layer tuples,
  each per-shard arg [1, ...] (its leading axis is the shards')."""
  read = plan.read
  pool = paged_attention.pool_spec(read)
  shard = PartitionSpec(read.batch)
  return paged_attention.per_device(fn, read, (pool, pool) + (shard,) * n_rows_args, (pool, pool))


def _copy_pages(state: PagedState, src: Array, dst: Array, plan: Plan) -> PagedState:
  """Copy page src[g, i] to dst[g, i] of shard g, every layer (dst NPl: nothing)."""

  def copy(k, v, src, dst):
    src, dst = jnp.minimum(src[0], plan.pages - 1), dst[0]
    put = lambda x: x.at[:, dst].set(x[:, src], mode="drop")
    return tuple(map(put, k)), tuple(map(put, v))

  k, v = _on_pages(copy, plan, 2)(state.k, state.v, src, dst)
  return state.replace(k=k, v=v)


def _write_prompts(state: PagedState, cache: qwen2.KVCache, pages: Array, plen: Array,
                   plan: Plan) -> PagedState:
  """The prefilled prompts' keys and values (cache [G * Fb, K, P, H] per layer, left-padded)
  into their pages [G, Fb, Wp], from position 0."""
  ps, wp, p = plan.page_size, plan.prompt_pages, plan.prompt_width

  def write(k, v, ck, cv, pages, plen):
    pages, plen = pages[0], plen[0]  # [Fb, Wp], [Fb]
    fb = pages.shape[0]
    pos = jnp.arange(wp)[:, None] * ps + jnp.arange(ps)  # [Wp, PS]
    src = jnp.clip(p - plen[:, None, None] + pos[None], 0, p - 1)  # [Fb, Wp, PS]
    fi = jnp.arange(fb)[:, None, None]

    def put(pool, c):
      vals = c[fi, :, src]  # [Fb, Wp, PS, K, H]
      vals = vals.transpose(3, 0, 1, 2, 4).reshape(c.shape[1], fb * wp, ps, c.shape[3])
      return pool.at[:, pages.ravel()].set(vals.astype(pool.dtype), mode="drop")

    return tuple(map(put, k, ck)), tuple(map(put, v, cv))

  read = plan.read
  pool = paged_attention.pool_spec(read)
  cache_spec = PartitionSpec(read.batch, read.heads, None, None)
  shard = PartitionSpec(read.batch)
  fn = paged_attention.per_device(write, read, (pool, pool, cache_spec, cache_spec, shard, shard),
                                  (pool, pool))
  k, v = fn(state.k, state.v, cache.k, cache.v, pages, plen)
  return state.replace(k=k, v=v)


def _alloc_prompts(b: Book, local: Array, plen: Array, plan: Plan) -> tuple[Book, Array, Array]:
  """Pages for the prompts `local` [Fb] (the shard's prompt indices; Bl: none) of `plen` real
  tokens; -> the book, their pages [Fb, Wp] and whether they did not fit."""
  fb, wp = plan.batch, plan.prompt_pages
  valid = local < plan.prompts
  count = jnp.where(valid, -(-plen // plan.page_size), 0)
  start = jnp.cumsum(count) - count
  free = _free_list(b.refs, fb * wp)
  w = jnp.arange(wp)[None]
  pages = jnp.where(w < count[:, None], free[jnp.minimum(start[:, None] + w, fb * wp - 1)],
                    plan.pages)
  overflow = jnp.any(pages == plan.pages & (w < count[:, None]))
  return (b.replace(refs=b.refs.at[pages.ravel()].set(1, mode="drop"),
                    prompt_pages=b.prompt_pages.at[local].set(pages, mode="drop"),
                    prefilled=b.prefilled + jnp.sum(valid.astype(jnp.int32))),
          pages, overflow)


def _write_rows(state: PagedState, grow: Array, col: Array, token, logp, entropy, eos) -> PagedState:
  """Write each slot's token at (global row grow [S], column col [S]) of the output buffers
  (grow out of range: dropped)."""
  put = lambda buf, x: buf.at[grow, col].set(x.astype(buf.dtype), mode="drop")
  return state.replace(tokens=put(state.tokens, token), logprobs=put(state.logprobs, logp),
                       entropy=put(state.entropy, entropy),
                       lengths=state.lengths.at[grow].set(col + 1, mode="drop"),
                       eos=state.eos.at[grow].set(eos, mode="drop"))


def _rows_of(keys: Array, lead: int) -> Array:
  """Keys [*lead axes, (2)] -> one per row [R, (2)] (typed keys, or raw uint32 pairs)."""
  return keys.reshape(-1, *keys.shape[lead:])


def _replicate(x, plan: Plan):
  mesh = plan.read.mesh
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))


@functools.partial(jax.jit, static_argnames=("config", "plan", "sampler"),
                   donate_argnames=("state",))
def _prefill(params, state: PagedState, tokens, mask, local, eos_id, *, config, plan, sampler
             ) -> PagedState:
  """Prefill prompts tokens/mask [G * Fb, P] (shard g's are rows g*Fb ..; `local` [G, Fb] their
  indices in the shard, Bl: none) into pages, and sample every row's first token."""
  g, fb, n = plan.shards, plan.batch, plan.n
  cache = qwen2.init_cache(config, g * fb, plan.prompt_width)
  logits, cache = qwen2.apply_with_cache(params, tokens, qwen2.positions_from_mask(mask), mask,
                                         cache, config)
  plen = jnp.sum(mask, axis=-1).astype(jnp.int32).reshape(g, fb)
  book, pages, overflow = jax.vmap(functools.partial(_alloc_prompts, plan=plan))(
      state.book, local, plen)
  state = _write_prompts(state.replace(book=book), cache, pages, plen, plan)
  # Every sample's first token, from its prompt's last logits (as the static sampler's prefill).
  rows = local[..., None] * n + jnp.arange(n)  # [G, Fb, n]
  valid = jnp.broadcast_to((local < plan.prompts)[..., None], rows.shape)
  rows = jnp.where(valid, rows, plan.rows)
  keys = _rows_of(jax.vmap(lambda k, r: k[jnp.minimum(r, plan.rows - 1)])(state.keys, rows),
                  3)
  last = _replicate(jnp.repeat(logits[:, -1], n, axis=0), plan)  # [G * Fb * n, V]
  token = sampler.next_token(last, sampling.step_keys(keys, 0))
  logp, entropy = sampling.token_stats(last, token)
  ended = (token == eos_id) | (plan.max_new_tokens == 1)
  grow = jnp.where(valid, jnp.arange(g)[:, None, None] * plan.rows + rows, g * plan.rows)
  state = _write_rows(state, grow.reshape(-1), jnp.zeros_like(token), token, logp, entropy,
                      token == eos_id)
  b = state.book
  token, ended = token.reshape(g, fb, n), ended.reshape(g, fb, n)
  shard_put = jax.vmap(lambda x, r, y: x.at[r.reshape(-1)].set(y.reshape(-1), mode="drop"))
  prompt = jnp.where(local < plan.prompts, local, plan.prompts)
  left = jax.vmap(lambda x, i, y: x.at[i].set(y, mode="drop"))(
      b.prompt_left, prompt, n - jnp.sum(ended.astype(jnp.int32), axis=-1))
  b = b.replace(first=shard_put(b.first, rows, token),
                status=shard_put(b.status, jnp.where(ended, rows, plan.rows),
                                 jnp.full(ended.shape, DONE, jnp.int32)),
                prompt_left=left)
  b = jax.vmap(functools.partial(_release_prompts, plan=plan))(b)
  c = state.counters
  return _constrain(state.replace(book=b, counters=c.replace(
      overflow=c.overflow | jnp.any(overflow).astype(jnp.int32))), plan)


def _step(params, state: PagedState, eos_id, *, config, plan, sampler) -> PagedState:
  """One iteration of the decode loop: refill, pages, one decode step, release."""
  vm = lambda fn: jax.vmap(functools.partial(fn, plan=plan))
  book, started, copy_src = vm(_admit)(state.book)
  book, page, victim, overflow = vm(_allocate)(book, started)
  state = _copy_pages(state.replace(book=book), copy_src, jnp.where(started, page, plan.pages),
                      plan)
  b = state.book
  g, sl = plan.shards, plan.slots
  live = b.active.reshape(-1)
  lengths = b.lengths.reshape(-1)
  cache = PagedCache(k=state.k, v=state.v, table=b.table.reshape(g * sl, plan.width),
                     lengths=lengths, live=live, read=plan.read)
  ones = jnp.ones((g * sl, 1), jnp.int32)
  logits, cache = qwen2.apply_with_cache(params, b.last.reshape(-1, 1), lengths[:, None], ones,
                                         cache, config)
  logits = logits[:, 0]
  t = b.t.reshape(-1)
  keys = _rows_of(jax.vmap(lambda k, r: k[r])(state.keys, b.row), 2)
  token = _replicate(sampler.next_token(logits, sampling.step_keys(keys, t)), plan)
  logp, entropy = sampling.token_stats(logits, token)
  grow = jnp.where(live, (jnp.arange(g)[:, None] * plan.rows + b.row).reshape(-1), g * plan.rows)
  ended = live & ((token == eos_id) | (t + 1 >= plan.max_new_tokens))
  state = _write_rows(state.replace(k=cache.k, v=cache.v), grow, t, token, logp, entropy,
                      token == eos_id)
  book = vm(_advance)(b, token.reshape(g, sl), ended.reshape(g, sl))
  reads = jnp.where(live, lengths + 1, 0)
  c = state.counters
  kernel = paged_attention.kernel_reads(reads, live, plan.page_size, plan.read.block)
  used = jnp.sum((book.refs > 0).astype(jnp.int32))
  c = c.replace(steps=c.steps + 1, busy=c.busy + jnp.sum(live.astype(jnp.int32)),
                kernel_read=c.kernel_read + jnp.sum(kernel).astype(jnp.float32),
                gather_read=c.gather_read + jnp.sum(jax.vmap(functools.partial(
                    paged_attention.gather_read, page_size=plan.page_size,
                    entries=plan.read.entries))(reads.reshape(g, sl))).astype(jnp.float32),
                filled=c.filled + jnp.sum(reads).astype(jnp.float32),
                preempted=c.preempted + jnp.sum(victim.astype(jnp.int32)),
                peak=jnp.maximum(c.peak, used),
                overflow=c.overflow | jnp.any(overflow).astype(jnp.int32))
  return _constrain(state.replace(book=book, counters=c), plan)


def _go_on(state: PagedState, plan: Plan) -> Array:
  """Whether the loop runs another step (module docstring: when it returns to the host)."""
  b = state.book
  ready = jax.vmap(functools.partial(_ready, plan=plan))(b)
  work = jnp.any(b.active) | jnp.any(ready)
  wants = jnp.any(jax.vmap(functools.partial(_wants_prefill, plan=plan))(b))
  go = work & ~wants
  if plan.read.kernel == "gather":
    # Once no row waits, a call whose live rows fit in half its slots returns for the host to
    # decode them in fewer (`_decode`'s live_slots): on CPU a step's cost follows its slots.
    live = jnp.max(jnp.sum(b.active.astype(jnp.int32), axis=1))
    go &= jnp.any(b.status == WAITING) | (2 * live >= plan.slots) | (plan.slots <= plan.min_slots)
  return go


_SLOT_FIELDS = ("table", "lengths", "shared", "last", "t", "row", "active")


def _live_first(book: Book) -> Book:
  """Each shard's slots reordered: live ones first."""
  order = jnp.argsort(~book.active, axis=1, stable=True)  # [G, Sl]
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  return book.replace(**{f: take(getattr(book, f)) for f in _SLOT_FIELDS})


@functools.partial(jax.jit, static_argnames=("config", "plan", "sampler", "live_slots"),
                   donate_argnames=("state",))
def _decode(params, state: PagedState, eos_id, *, config, plan, sampler, live_slots):
  """Decode (refilling slots on the device) until the host is needed; -> the state and the
  replicated summary the host schedules from ([G, 6] per shard, then the counters). With
  live_slots < plan.slots, the live rows are first moved to the first live_slots slots of their
  shard and the call decodes those only (the host gives every live row one)."""
  full = plan
  if live_slots < plan.slots:
    plan = dataclasses.replace(plan, slots=live_slots)
    plan = dataclasses.replace(plan, read=dataclasses.replace(plan.read,
                                                              entries=plan.max_entries))
    book = _live_first(state.book)
    state = state.replace(book=book.replace(
        **{f: getattr(book, f)[:, :live_slots] for f in _SLOT_FIELDS}))
  body = functools.partial(_step, params, eos_id=eos_id, config=config, plan=plan,
                           sampler=sampler)
  state = jax.lax.while_loop(functools.partial(_go_on, plan=plan), body,
                             _constrain(state.replace(counters=_counters()), plan))
  if live_slots < full.slots:  # the rest of the slots are idle
    head = state.book
    state = state.replace(book=head.replace(**{
        f: jnp.concatenate([getattr(head, f), getattr(book, f)[:, live_slots:]], axis=1)
        for f in _SLOT_FIELDS}))
  return state, _summary(state, full)


def _summary(state: PagedState, plan: Plan) -> Array:
  shards = jax.vmap(functools.partial(_shard_summary, plan=plan))(state.book)  # [G, 6]
  c = state.counters
  counters = jnp.stack([c.steps.astype(jnp.float32), c.busy.astype(jnp.float32), c.kernel_read,
                        c.gather_read, c.filled, c.preempted.astype(jnp.float32),
                        c.peak.astype(jnp.float32), c.overflow.astype(jnp.float32),
                        jnp.all(state.book.status == DONE).astype(jnp.float32)])
  return _replicate(jnp.concatenate([shards.reshape(-1).astype(jnp.float32), counters]), plan)
# --------------------------------------------------------------------------------------------------
# The host loop
# --------------------------------------------------------------------------------------------------

_SUMMARY = 5  # per shard: prefilled, free pages, waiting rows, live slots, wants


def _platform(mesh: Mesh | None) -> str:
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def run(config: Qwen2Config, params: Params, prompt_tokens, prompt_mask, rng, *,
        max_new_tokens: int, sampler: sampling.Sampler, eos_id: int, n: int, slots: int,
        kv_pages: int, page_size: int = PAGE_SIZE, page_block: int = PAGE_BLOCK,
        attention: str = "auto", prompt_index, sample_offset: int = 0,
        mesh: Mesh | None = None) -> tuple[sampling.Rollout, dict]:
  """Rollout of n samples per prompt [B, P] through `slots` decode slots over a pool of
  `kv_pages` pages of `page_size` positions (0: enough that no row is ever preempted); (Rollout,
  stats). attention: `kernel_for`'s name; page_block: pages per block of the Pallas kernels'
  reads."""
  tokens_h = np.asarray(sharding.to_host(prompt_tokens), np.int32)
  mask_h = np.asarray(sharding.to_host(prompt_mask), np.int32)
  b, p = tokens_h.shape
  plan = make_plan(config, b, p, max_new_tokens=max_new_tokens, n=n, slots=slots,
                   kv_pages=kv_pages, page_size=page_size, page_block=page_block,
                   kernel=kernel_for(_platform(mesh), attention), mesh=mesh)
  g, bl, fb = plan.shards, plan.prompts, plan.batch
  eos = jnp.int32(eos_id)
  state = _start(rng, jnp.asarray(prompt_index, jnp.int32), jnp.int32(sample_offset),
                 jnp.asarray(mask_h.sum(-1), jnp.int32), eos, config=config, plan=plan)
  prefilled = np.zeros(g, np.int64)
  shard = np.zeros((g, _SUMMARY), np.int64)
  wants = np.ones(g, bool)
  totals = np.zeros(7)  # steps, busy, kernel read, gather read, filled, preempted, (peak)
  peak = calls = prefills = slot_steps = 0
  last_slots = 0
  while True:
    if wants.any():
      local = np.where(wants[:, None], prefilled[:, None] + np.arange(fb), bl)  # [G, Fb]
      local = np.where(local < bl, local, bl)
      ids = (np.arange(g)[:, None] * bl + np.minimum(local, bl - 1)).reshape(-1)
      state = _prefill(params, state, tokens_h[ids], mask_h[ids], jnp.asarray(local, jnp.int32),
                       eos, config=config, plan=plan, sampler=sampler)
      prefills += 1
    live_slots = plan.slots
    if plan.read.kernel == "gather" and not wants.any() and not shard[:, 2].any():
      # No row waits: decode the live rows in fewer slots (a power of two: few compiles).
      live_slots = min(plan.slots, max(plan.min_slots,
                                       1 << max(0, int(shard[:, 3].max()) - 1).bit_length()))
    state, summary = _decode(params, state, eos, config=config, plan=plan, sampler=sampler,
                             live_slots=live_slots)
    summary = np.asarray(summary.addressable_shards[0].data, np.float64)
    calls += 1
    shard = summary[:g * _SUMMARY].reshape(g, _SUMMARY).astype(np.int64)
    counters = summary[g * _SUMMARY:]
    prefilled = shard[:, 0]
    totals[:6] += counters[:6]
    slot_steps += counters[0] * live_slots * g
    peak = max(peak, int(counters[6]))
    if counters[7]:
      raise RuntimeError(f"paged engine: a live row found no free page ({plan})")
    if counters[8]:
      break
    progressed = counters[0] > 0 or wants.any() or live_slots != last_slots
    last_slots = live_slots
    wants = shard[:, 4].astype(bool)
    if not progressed and not wants.any():
      raise RuntimeError(f"paged engine: a device call ran no step (summary {shard.tolist()})")
  rollout = sampling.rollout_from_buffers(state.tokens, state.logprobs, state.entropy,
                                          state.lengths, state.eos, prompt_tokens, prompt_mask,
                                          n=n)
  steps, busy, kernel_read, gather_read, filled, preempted = totals[:6]
  stats = {"slot_steps": slot_steps, "busy_slot_steps": busy, "decode_steps": steps,
           "slot_utilization": busy / max(slot_steps, 1),
           # KV positions the Pallas kernels read (each live row's pages in whole blocks of
           # page_block pages) over those the rows attend; the gather's own read beside it.
           "kv_read_positions": kernel_read, "kv_filled_positions": filled,
           "kv_read_over_filled": kernel_read / max(filled, 1.0),
           "kv_gather_read_positions": gather_read,
           "kv_gather_read_over_filled": gather_read / max(filled, 1.0),
           "kv_pages": plan.pages * g, "page_size": plan.page_size, "peak_pages": peak,
           "preemptions": preempted, "host_round_trips": calls, "prefills": prefills,
           "chunks": calls}
  return rollout, stats
