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
rows' growth. When the live rows still need more pages than are free, the youngest rows (fewest
tokens: the least work lost) give theirs back and go back to the queue; they start again later
from their prompt's pages. A row's draws depend only on (rng, prompt, sample, position)
(`sampling.row_keys`), so the restarted row samples the same tokens: preemption never changes a
rollout. (The bookkeeping of slots, rows and pages: `explore_jax.rollout.pages`.)

Refill on the device. One jitted `lax.while_loop` (`_decode`) refills free slots from the rows of
the prefilled prompts, allocates pages, preempts, decodes one step of every live slot and
returns finished rows' pages, step after step. It returns to the host only when a shard has no
prefilled row left to start and the pool has room for the next batch of prompts (the host then
prefills it: `_prefill`), when every row is done, or (on CPU, below) to decode in more or fewer
slots. Every decision is a function of replicated device state, so every process makes the same
ones; the stats count the host round trips.

Shards. On a mesh the slots, the pages and the output rows are split over the batch axes into G
shards; shard g owns prompts g*B/G .. (g+1)*B/G - 1 (the rows its devices hold in the output),
its slots and its pages, and schedules them alone: the bookkeeping is written for one shard and
vmapped over G (it is small and replicated); the pages themselves are written and read per
device (`paged_attention.per_device`).

Attention by platform (`paged_attention.PagedRead`): the Pallas TPU kernel on TPU, a native
kernel on CPU (`cpu_paged_attention`, where a C++ compiler builds it), the pure-JAX gather
elsewhere (the Pallas GPU kernel on request). With the CPU reads a step costs about as much per
slot as per position read, so once no row waits, the calls decode the live rows in the fewest
slots (`_bucket`'s sizes, at least MIN_SLOTS) that hold them: the live rows are moved to the
first slots of their shard (only their bookkeeping moves; their pages stay). On CPU the gather's
decode program is compiled with YNNPACK for its dots only (`CPU_COMPILER_OPTIONS`). Stats count
what the Pallas kernels read (each live row's pages rounded up to whole blocks) and, beside it,
what the read in use read.
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
from explore_jax.models.paged_attention import PagedCache
from explore_jax.models.qwen2 import Params, Qwen2Config
from explore_jax.rollout import pages, sampling
from explore_jax.rollout.pages import DONE, Book, Plan
from explore_jax.tpu import sharding

Array = jax.Array

PAGE_SIZE = 16  # positions per page (generate's default)
PAGE_BLOCK = 2  # pages per block of the Pallas kernels' reads


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Counters:
  """What one device call did (the host adds them up)."""
  steps: Array  # decode steps
  busy: Array  # live slot-steps
  kernel_read: Array  # f32 KV positions the Pallas kernels read
  own_read: Array  # f32 KV positions the read in use read (`paged_attention.own_read`)
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


def state_shardings(state: PagedState, plan: Plan) -> PagedState:
  """Pages split like the slots (and kv heads over `tensor`), output rows over the batch axes,
  the bookkeeping replicated (what `_constrain` pins, and what `explore_jax.aot` gives its
  abstract states)."""
  mesh = plan.read.mesh
  pool = NamedSharding(mesh, paged_attention.pool_spec(plan.read))
  rows = lambda x: NamedSharding(mesh, PartitionSpec(plan.read.batch, *(None,) * (x.ndim - 1)))
  rep = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda _: rep, state).replace(
      k=tuple(pool for _ in state.k), v=tuple(pool for _ in state.v),
      tokens=rows(state.tokens), logprobs=rows(state.logprobs), entropy=rows(state.entropy),
      lengths=rows(state.lengths), eos=rows(state.eos))


def _constrain(state: PagedState, plan: Plan) -> PagedState:
  if plan.read.mesh is None:
    return state
  return jax.tree.map(jax.lax.with_sharding_constraint, state, state_shardings(state, plan))


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


def _write_rows(state: PagedState, grow: Array, col: Array, token, logp, entropy, eos
                ) -> PagedState:
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
  book, held, overflow = jax.vmap(functools.partial(pages.alloc_prompts, plan=plan))(
      state.book, local, plen)
  state = _write_prompts(state.replace(book=book), cache, held, plen, plan)
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
  b = jax.vmap(functools.partial(pages.release_prompts, plan=plan))(b)
  c = state.counters
  return _constrain(state.replace(book=b, counters=c.replace(
      overflow=c.overflow | jnp.any(overflow).astype(jnp.int32))), plan)


def _step(params, state: PagedState, eos_id, *, config, plan, sampler) -> PagedState:
  """One iteration of the decode loop: refill, pages, one decode step, release."""
  book, started, copy_src = pages.refill_all(state.book, plan)
  book, page, victim, overflow = pages.pages_all(book, started, plan)
  state = jax.lax.cond(jnp.any(started), functools.partial(_copy_pages, plan=plan),
                       lambda s, src, dst: s, state.replace(book=book), copy_src,
                       jnp.where(started, page, plan.pages))
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
  book = pages.finish_all(b, token.reshape(g, sl), ended.reshape(g, sl), plan)
  reads = jnp.where(live, lengths + 1, 0)
  c = state.counters
  kernel = paged_attention.kernel_reads(reads, live, plan.page_size, plan.read.block)
  used = jnp.sum((book.refs > 0).astype(jnp.int32))
  c = c.replace(steps=c.steps + 1, busy=c.busy + jnp.sum(live.astype(jnp.int32)),
                kernel_read=c.kernel_read + jnp.sum(kernel).astype(jnp.float32),
                own_read=c.own_read + jnp.sum(jax.vmap(functools.partial(
                    paged_attention.own_read, page_size=plan.page_size, read=plan.read))(
                        reads.reshape(g, sl))).astype(jnp.float32),
                filled=c.filled + jnp.sum(reads).astype(jnp.float32),
                preempted=c.preempted + jnp.sum(victim.astype(jnp.int32)),
                peak=jnp.maximum(c.peak, used),
                overflow=c.overflow | jnp.any(overflow).astype(jnp.int32))
  return _constrain(state.replace(book=book, counters=c), plan)


def _go_on(state: PagedState, plan: Plan, full_slots: int) -> Array:
  """Whether the loop runs another step (module docstring: when it returns to the host)."""
  b = state.book
  ready = jax.vmap(functools.partial(pages.ready, plan=plan))(b)
  work = jnp.any(b.active) | jnp.any(ready)
  wants = jnp.any(jax.vmap(functools.partial(pages.wants_prefill, plan=plan))(b))
  go = work & ~wants
  if plan.read.on_cpu_cores and (plan.slots < full_slots or plan.slots > plan.min_slots):
    # On CPU a step costs in proportion to its slots: the call returns for the host to decode in
    # more slots (`_decode`'s live_slots) when the pages admit a ready row but no slot is free,
    # in fewer when its live rows fit in the next smaller number (`_bucket`'s) and the pages
    # admit none.
    live = jnp.sum(b.active.astype(jnp.int32), axis=1)  # [G]
    more = jax.vmap(lambda b: pages.admissible(b, plan)[1])(b)  # [G]
    grow = jnp.any((more > 0) & (live == plan.slots)) & (plan.slots < full_slots)
    smaller = max(plan.min_slots, _bucket_below(plan.slots))
    shrink = (jnp.all(live <= smaller) & jnp.all(more == 0) & (plan.slots > plan.min_slots))
    go &= ~grow & ~shrink
  return go


_SLOT_FIELDS = ("table", "lengths", "shared", "last", "t", "row", "active")


def _live_first(book: Book) -> Book:
  """Each shard's slots reordered: live ones first."""
  order = jnp.argsort(~book.active, axis=1, stable=True)  # [G, Sl]
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  return book.replace(**{f: take(getattr(book, f)) for f in _SLOT_FIELDS})


def _decode_loop(params, state: PagedState, eos_id, *, config, plan, sampler, live_slots):
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
  state = jax.lax.while_loop(functools.partial(_go_on, plan=plan, full_slots=full.slots), body,
                             _constrain(state.replace(counters=_counters().replace(
                                 overflow=state.counters.overflow)), plan))
  if live_slots < full.slots:  # the rest of the slots are idle
    head = state.book
    state = state.replace(book=head.replace(**{
        f: jnp.concatenate([getattr(head, f), getattr(book, f)[:, live_slots:]], axis=1)
        for f in _SLOT_FIELDS}))
  return state, _summary(state, full)


_DECODE_JIT = dict(static_argnames=("config", "plan", "sampler", "live_slots"),
                   donate_argnames=("state",))
_decode = jax.jit(_decode_loop, **_DECODE_JIT)
# On CPU, XLA hands both dots and reductions to YNNPACK by default (its
# `xla_cpu_experimental_ynn_fusion_type`: individual dots and reductions). The gather's
# reductions are many small ones, a page's products each: at head dim 16 they ran 1.3x faster in
# XLA's own loops, at 32 as fast (`benchmarks/paged_read.py`). So the gather's CPU decode program
# keeps YNNPACK for its dots only (the native CPU kernel's, which has no such reductions, keeps
# the defaults).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
_decode_cpu = jax.jit(_decode_loop, compiler_options=CPU_COMPILER_OPTIONS, **_DECODE_JIT)


def _summary(state: PagedState, plan: Plan) -> Array:
  shards = jax.vmap(functools.partial(pages.shard_summary, plan=plan))(state.book)  # [G, 6]
  c = state.counters
  counters = jnp.stack([c.steps.astype(jnp.float32), c.busy.astype(jnp.float32), c.kernel_read,
                        c.own_read, c.filled, c.preempted.astype(jnp.float32),
                        c.peak.astype(jnp.float32), c.overflow.astype(jnp.float32),
                        jnp.all(state.book.status == DONE).astype(jnp.float32)])
  return _replicate(jnp.concatenate([shards.reshape(-1).astype(jnp.float32), counters]), plan)
# --------------------------------------------------------------------------------------------------
# The host loop
# --------------------------------------------------------------------------------------------------

_SUMMARY = 6  # per shard: prefilled, free pages, waiting rows, live slots, wants, admissible


def _bucket(x: int) -> int:
  """x rounded up to a call size: up to 32, 2^k or 3 x 2^(k-1) (1, 2, 3, 4, 6, .. 24, 32: few
  programs for a drain); above, a multiple of an eighth of the power of two at or above x (40,
  48, 56, 64, 80, ..: under a quarter more slots than rows, where a step's cost follows them)."""
  up = 1 << max(0, int(x) - 1).bit_length()
  if up > 32:
    step = up // 8
    return -(-int(x) // step) * step
  return 3 * up // 4 if 3 * up // 4 >= x else up


def _bucket_below(x: int) -> int:
  """The largest `_bucket` value under x."""
  return next(y for y in range(x - 1, 0, -1) if _bucket(y) == y) if x > 1 else 0


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
  plan = pages.make_plan(config, b, p, max_new_tokens=max_new_tokens, n=n, slots=slots,
                   kv_pages=kv_pages, page_size=page_size, page_block=page_block,
                   kernel=pages.kernel_for(_platform(mesh), attention, config.dtype), mesh=mesh,
                   fixed_length=eos_id == sampling.NO_EOS)
  g, bl, fb = plan.shards, plan.prompts, plan.batch
  decode = _decode_cpu if plan.read.kernel == "gather" and _platform(mesh) == "cpu" else _decode
  eos = jnp.int32(eos_id)
  state = _start(rng, jnp.asarray(prompt_index, jnp.int32), jnp.int32(sample_offset),
                 jnp.asarray(mask_h.sum(-1), jnp.int32), eos, config=config, plan=plan)
  prefilled = np.zeros(g, np.int64)
  shard = np.zeros((g, _SUMMARY), np.int64)
  wants = np.ones(g, bool)
  totals = np.zeros(7)  # steps, busy, kernel read, own read, filled, preempted, (peak)
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
    if plan.read.on_cpu_cores and not wants.any():
      # The live rows and those the pages admit now, in the fewest slots of `_bucket`'s sizes
      # that hold them.
      need = int((shard[:, 3] + shard[:, 5]).max())
      live_slots = min(plan.slots, max(plan.min_slots, _bucket(need)))
    state, summary = decode(params, state, eos, config=config, plan=plan, sampler=sampler,
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
  steps, busy, kernel_read, own_read, filled, preempted = totals[:6]
  stats = {"slot_steps": slot_steps, "busy_slot_steps": busy, "decode_steps": steps,
           "slot_utilization": busy / max(slot_steps, 1),
           # KV positions the Pallas kernels read (each live row's pages in whole blocks of
           # page_block pages) over those the rows attend; beside it, what the read in use
           # (`page_attention`) read: the gather its flat list's size, the native CPU kernel
           # exactly the positions.
           "kv_read_positions": kernel_read, "kv_filled_positions": filled,
           "kv_read_over_filled": kernel_read / max(filled, 1.0),
           "page_attention": plan.read.kernel, "kv_own_read_positions": own_read,
           "kv_own_read_over_filled": own_read / max(filled, 1.0),
           "kv_pages": plan.pages * g, "page_size": plan.page_size, "peak_pages": peak,
           "preemptions": preempted, "host_round_trips": calls, "prefills": prefills,
           "chunks": calls}
  return rollout, stats
