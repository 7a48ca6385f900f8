"""The page pool's bookkeeping: one shard's slots, rows, prompts and page references.

`explore_jax.rollout.paged` holds [G, ...] of every field of a `Book` (one per batch shard,
replicated) and vmaps these pure functions over G; the pages' contents live there. Here only
integers move: which slot decodes which row, which pages each slot's table and each prompt hold,
how many references each page has (0: free).

  admit     start waiting rows of prefilled prompts in free slots, within the free pages less
            a reserve for the live rows' growth (RESERVE_STEPS steps of it)
  preempt   when the live rows need more pages than are free, the youngest rows return theirs
            (their rows WAITING again)
  allocate  a fresh page for each live slot about to write the first position of a page (a
            started row: its copy of the prompt's last, partly filled page)
  advance, finish   after a step: the rows took a token; rows that ended return their pages,
            and their prompt's once its last sample is done

`simulate` runs these same functions with each row's length drawn beforehand instead of a
model: what a pool of pages holds at a length distribution (`explore_jax.aot` reports it).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from explore_jax.models import paged_attention
from explore_jax.models.paged_attention import PagedRead
from explore_jax.models.qwen2 import Qwen2Config
from explore_jax.tpu import sharding

Array = jax.Array

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
  # Every row runs max_new_tokens (no EOS): a row is admitted only when the pool holds it and
  # the live rows at full length (nothing to gain from more, and no row is ever preempted).
  fixed_length: bool
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


def kernel_for(platform: str, name: str = "auto", dtype=jnp.float32) -> str:
  """The paged attention kernel: `auto` is the Pallas kernel on TPU, the native CPU kernel on CPU
  (where it builds, for float32 and bfloat16 caches), the gather elsewhere (on a GPU the Pallas
  kernel is taken when named, until measured to beat the gather there)."""
  from explore_jax.models import cpu_paged_attention
  if name == "auto":
    if platform == "tpu":
      return "pallas_tpu"
    native = platform == "cpu" and jnp.dtype(dtype) in cpu_paged_attention.DTYPES
    return "native_cpu" if native and cpu_paged_attention.available() else "gather"
  if name not in paged_attention.KERNELS:
    raise ValueError(f"page_attention={name!r}: use 'auto' or one of {paged_attention.KERNELS}")
  if name == "native_cpu":
    if platform != "cpu":
      raise ValueError(f"page_attention='native_cpu' runs on CPU only, not on {platform}")
    if jnp.dtype(dtype) not in cpu_paged_attention.DTYPES:
      raise ValueError(f"page_attention='native_cpu' reads {cpu_paged_attention.DTYPES} caches, "
                       f"not {jnp.dtype(dtype)}")
    cpu_paged_attention.build()  # raises with the compiler's message where it cannot be built
  return name


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
              mesh: Mesh | None, fixed_length: bool = False) -> Plan:
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
  held_prompts = min(local_prompts, local_slots + batch)
  pages = kv_pages // shards or local_slots * full_row + held_prompts * wp
  # A row at full length must fit beside the prompts that hold pages (those of the live rows and
  # of a prefill batch): then the oldest row always finishes.
  least = full_row + held_prompts * wp
  if pages < least:
    raise ValueError(f"paged engine: kv_pages={kv_pages} gives {pages} pages per batch shard; "
                     f"at least {least} are needed (a full row of {full_row} pages beside the "
                     f"prompt pages of up to {held_prompts} prompts)")
  plan = Plan(shards, local_slots, pages, page_size, width, prompt_width, wp, max_new_tokens, n,
              local_prompts, batch, MIN_SLOTS, fixed_length, read)
  return dataclasses.replace(plan, read=dataclasses.replace(read, entries=plan.max_entries))



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



def free_list(refs: Array, size: int) -> Array:
  """The first `size` free pages (the pool's size where fewer are free)."""
  return jnp.nonzero(refs == 0, size=size, fill_value=refs.shape[0])[0].astype(jnp.int32)


def release(b: Book, mask: Array, status: int, plan: Plan) -> Book:
  """Slots `mask` [Sl] give their pages back (a shared prompt page loses one reference) and
  their rows take `status` (WAITING: preempted, DONE: ended)."""
  held = jnp.arange(plan.width)[None] < -(-b.lengths // plan.page_size)[:, None]  # [Sl, W]
  drop = jnp.where(mask[:, None] & held, b.table, plan.pages)
  refs = b.refs.at[drop.ravel()].add(-1, mode="drop")
  status_ = b.status.at[jnp.where(mask, b.row, plan.rows)].set(status, mode="drop")
  return b.replace(refs=refs, status=status_, active=b.active & ~mask,
                   table=jnp.where(mask[:, None], plan.pages, b.table),
                   lengths=jnp.where(mask, 0, b.lengths))


def ready(b: Book, plan: Plan) -> Array:
  """[Rl] rows waiting whose prompt is prefilled."""
  return (b.status == WAITING) & (jnp.arange(plan.rows) // plan.n < b.prefilled)


def reserve(b: Book, plan: Plan) -> Array:
  live = jnp.sum(b.active.astype(jnp.int32))
  return -(-live * RESERVE_STEPS // plan.page_size)


def _full_pages(plen: Array, plan: Plan) -> Array:
  """Pages a row of a prompt of `plen` tokens holds at full length (its P + N - 1 positions)."""
  return -(-(plen + plan.max_new_tokens - 1) // plan.page_size)


def admissible(b: Book, plan: Plan) -> tuple[Array, Array]:
  """(ready rows [Rl], how many of the first of them the free pages admit now, free slots
  aside). Long-tailed lengths: each takes one page, beside the live rows' next pages and the
  reserve. Fixed lengths: each its pages at full length, beside the live rows' remaining ones."""
  waiting = ready(b, plan)
  free_pages = jnp.sum((b.refs == 0).astype(jnp.int32))
  if not plan.fixed_length:
    live_need = jnp.sum((b.active & (b.lengths % plan.page_size == 0)).astype(jnp.int32))
    count = jnp.maximum(free_pages - live_need - reserve(b, plan), 0)
    return waiting, jnp.minimum(count, jnp.sum(waiting.astype(jnp.int32)))
  plen_live = b.prompt_len[b.row // plan.n]
  growth = jnp.where(b.active, _full_pages(plen_live, plan) - -(-b.lengths // plan.page_size), 0)
  budget = free_pages - jnp.sum(growth)
  first = jnp.nonzero(waiting, size=plan.slots, fill_value=plan.rows)[0]  # the next rows
  plen = b.prompt_len[jnp.minimum(first, plan.rows - 1) // plan.n]
  own = _full_pages(plen, plan) - plen // plan.page_size  # shared prompt pages are held already
  fits = (jnp.cumsum(own) <= budget) & (first < plan.rows)
  return waiting, jnp.sum(jnp.cumprod(fits.astype(jnp.int32)))


def admit(b: Book, plan: Plan) -> tuple[Book, Array, Array]:
  """Start the first waiting rows of prefilled prompts in free slots, as many as the free pages
  allow beside the live rows' next pages and the reserve. Returns the book, the slots that
  started [Sl] and, for each, the prompt page to copy into its first page of its own (the
  partly filled last one; NPl: none)."""
  ps, sl = plan.page_size, plan.slots
  waiting, allowed = admissible(b, plan)
  count = jnp.minimum(jnp.sum((~b.active).astype(jnp.int32)), allowed)
  take = jnp.arange(sl) < count
  slot = jnp.where(take, jnp.nonzero(~b.active, size=sl, fill_value=sl)[0], sl)  # sl: dropped
  row = jnp.where(take, jnp.nonzero(waiting, size=sl, fill_value=0)[0], 0)
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


def needs_page(b: Book, started: Array, plan: Plan) -> Array:
  """[Sl] live slots whose step writes the first position of a page, and rows that just started
  (their copy of the prompt's last page, or a fresh one)."""
  return b.active & ((b.lengths % plan.page_size == 0) | started)


def preempt(b: Book, need: Array, started: Array, plan: Plan) -> tuple[Book, Array]:
  """When fewer pages are free than `need` [Sl] asks for, the youngest running rows give theirs
  back (the rows go back to WAITING) until enough are. -> the book and the preempted slots."""
  deficit = jnp.sum(need.astype(jnp.int32)) - jnp.sum((b.refs == 0).astype(jnp.int32))
  # Preempting a slot frees its own pages and drops its need; started rows are not candidates
  # (`admit` left pages for them).
  cand = b.active & ~started
  gain = jnp.where(cand, -(-b.lengths // plan.page_size) - b.shared + need.astype(jnp.int32), 0)
  order = jnp.argsort(jnp.where(cand, b.t, jnp.iinfo(jnp.int32).max), stable=True)
  before = jnp.cumsum(gain[order]) - gain[order]
  victim = jnp.zeros_like(need).at[order].set(cand[order] & (before < deficit))
  return release(b, victim, WAITING, plan), victim


def allocate(b: Book, need: Array, plan: Plan) -> tuple[Book, Array, Array]:
  """A free page for every slot of `need` [Sl], at its table entry of position `lengths`.
  -> the book, each slot's new page [Sl] (NPl: none) and whether a slot found none."""
  sl = plan.slots
  rank = jnp.cumsum(need.astype(jnp.int32)) - 1
  page = jnp.where(need, free_list(b.refs, sl)[jnp.clip(rank, 0, sl - 1)], plan.pages)
  overflow = jnp.any(need & (page >= plan.pages))
  at = b.lengths // plan.page_size
  table = b.table.at[jnp.where(need, jnp.arange(sl), sl), at].set(page, mode="drop")
  return b.replace(refs=b.refs.at[page].set(1, mode="drop"), table=table), page, overflow


def advance(b: Book, token: Array, plan: Plan) -> Book:
  """After a step: every live slot took `token` [Sl] at position `lengths`."""
  live = b.active
  return b.replace(lengths=jnp.where(live, b.lengths + 1, b.lengths),
                   t=jnp.where(live, b.t + 1, b.t), last=jnp.where(live, token, b.last))


def finish(b: Book, ended: Array, plan: Plan) -> Book:
  """Rows `ended` [Sl] are done: their pages go back, and their prompt's once its last sample
  is done."""
  left = b.prompt_left.at[jnp.where(ended, b.row // plan.n, plan.prompts)].add(-1, mode="drop")
  b = release(b, ended, DONE, plan).replace(prompt_left=left)
  return release_prompts(b, plan)


# --------------------------------------------------------------------------------------------------
# A step's bookkeeping on every shard ([G, ...] books)
# --------------------------------------------------------------------------------------------------
# Each part runs under a `lax.cond` on whether any shard has work for it (most steps start no
# row, preempt none and end none); the cond is outside the vmap over the shards, which would turn
# it into a select of both branches.


def _shards(fn, plan: Plan):
  return jax.vmap(functools.partial(fn, plan=plan))


def refill_all(books: Book, plan: Plan) -> tuple[Book, Array, Array]:
  """`admit` on every shard: -> books, started slots [G, Sl], pages to copy [G, Sl]."""
  shape = books.active.shape
  idle = (books, jnp.zeros(shape, bool), jnp.full(shape, plan.pages, jnp.int32))
  can = jnp.any(~books.active) & jnp.any(_shards(ready, plan)(books))
  return jax.lax.cond(can, _shards(admit, plan), lambda b: idle, books)


def pages_all(books: Book, started: Array, plan: Plan
              ) -> tuple[Book, Array, Array, Array]:
  """`preempt` then `allocate` on every shard: -> books, new pages [G, Sl], preempted slots
  [G, Sl], whether a slot found no page."""
  need = _shards(needs_page, plan)(books, started)
  short = jnp.any(jnp.sum(need, axis=1) > jnp.sum(books.refs == 0, axis=1))
  books, victim = jax.lax.cond(short, _shards(preempt, plan),
                               lambda b, need, started: (b, jnp.zeros_like(need)),
                               books, need, started)
  need &= ~victim
  none = lambda b, need: (b, jnp.full(need.shape, plan.pages, jnp.int32),
                         jnp.zeros(need.shape[:1], bool))
  books, page, overflow = jax.lax.cond(jnp.any(need), _shards(allocate, plan), none, books, need)
  return books, page, victim, jnp.any(overflow)


def finish_all(books: Book, token: Array, ended: Array, plan: Plan) -> Book:
  """`advance` then `finish` on every shard."""
  books = _shards(advance, plan)(books, token)
  return jax.lax.cond(jnp.any(ended), _shards(finish, plan), lambda b, ended: b, books, ended)


def release_prompts(b: Book, plan: Plan) -> Book:
  """Prompts whose samples are all done give their pages back."""
  done = (b.prompt_left == 0) & (b.prompt_pages[:, 0] < plan.pages)
  drop = jnp.where(done[:, None], b.prompt_pages, plan.pages)
  return b.replace(refs=b.refs.at[drop.ravel()].add(-1, mode="drop"),
                   prompt_pages=jnp.where(done[:, None], plan.pages, b.prompt_pages))


def next_batch_pages(b: Book, plan: Plan) -> Array:
  """Pages the shard's next prefill batch takes."""
  i = b.prefilled + jnp.arange(plan.batch)
  pages = -(-b.prompt_len[jnp.minimum(i, plan.prompts - 1)] // plan.page_size)
  return jnp.sum(jnp.where(i < plan.prompts, pages, 0))


def wants_prefill(b: Book, plan: Plan) -> Array:
  """The shard has no prefilled row left to start, prompts left, and room for their pages."""
  free = jnp.sum((b.refs == 0).astype(jnp.int32))
  return ((b.prefilled < plan.prompts) & ~jnp.any(ready(b, plan))
          & (free >= next_batch_pages(b, plan)))


def shard_summary(b: Book, plan: Plan) -> Array:
  """[6] what the host schedules from: prefilled, free pages, waiting rows, live slots, whether
  it wants a prefill, rows the pages admit now."""
  return jnp.stack([b.prefilled, jnp.sum((b.refs == 0).astype(jnp.int32)),
                    jnp.sum((b.status == WAITING).astype(jnp.int32)),
                    jnp.sum(b.active.astype(jnp.int32)),
                    wants_prefill(b, plan).astype(jnp.int32), admissible(b, plan)[1]])


def alloc_prompts(b: Book, local: Array, plen: Array, plan: Plan) -> tuple[Book, Array, Array]:
  """Pages for the prompts `local` [Fb] (the shard's prompt indices; Bl: none) of `plen` real
  tokens; -> the book, their pages [Fb, Wp] and whether they did not fit."""
  fb, wp = plan.batch, plan.prompt_pages
  valid = local < plan.prompts
  count = jnp.where(valid, -(-plen // plan.page_size), 0)
  start = jnp.cumsum(count) - count
  free = free_list(b.refs, fb * wp)
  w = jnp.arange(wp)[None]
  pages = jnp.where(w < count[:, None], free[jnp.minimum(start[:, None] + w, fb * wp - 1)],
                    plan.pages)
  overflow = jnp.any((pages == plan.pages) & (w < count[:, None]))
  return (b.replace(refs=b.refs.at[pages.ravel()].set(1, mode="drop"),
                    prompt_pages=b.prompt_pages.at[local].set(pages, mode="drop"),
                    prefilled=b.prefilled + jnp.sum(valid.astype(jnp.int32))),
          pages, overflow)




# --------------------------------------------------------------------------------------------------
# What a pool holds at a length distribution
# --------------------------------------------------------------------------------------------------


def draw_lengths(rows: int, cap: int, median: float, seed: int = 0) -> np.ndarray:
  """Response lengths (EOS included) of `rows` rows: geometric with the given median, the rows
  that reach `cap` cut there (RL responses: most far shorter than the cap, a long tail)."""
  stop = 1.0 - 2.0 ** (-1.0 / median)  # P(a token is the row's last)
  return np.minimum(np.random.default_rng(seed).geometric(stop, rows), cap).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("plan", "max_steps"))
def _simulate(prompt_len, lengths, *, plan: Plan, max_steps: int):
  sl, npl = plan.slots, plan.pages
  book = Book(refs=jnp.zeros((npl,), jnp.int32),
              table=jnp.full((sl, plan.width), npl, jnp.int32),
              lengths=jnp.zeros((sl,), jnp.int32), shared=jnp.zeros((sl,), jnp.int32),
              last=jnp.zeros((sl,), jnp.int32), t=jnp.zeros((sl,), jnp.int32),
              row=jnp.zeros((sl,), jnp.int32), active=jnp.zeros((sl,), bool),
              status=jnp.zeros((plan.rows,), jnp.int32), first=jnp.zeros((plan.rows,), jnp.int32),
              prompt_len=prompt_len, prompt_pages=jnp.full((plan.prompts, plan.prompt_pages), npl,
                                                           jnp.int32),
              prompt_left=jnp.full((plan.prompts,), plan.n, jnp.int32),
              prefilled=jnp.zeros((), jnp.int32))
  zero, fzero = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
  # steps, live slot-steps, peak pages, preempted, prefills, overflow; kernel read, filled
  counts = (zero,) * 6 + (fzero, fzero)

  def prefill(b):
    local = b.prefilled + jnp.arange(plan.batch)
    local = jnp.where(local < plan.prompts, local, plan.prompts)
    b, _, overflow = alloc_prompts(b, local, prompt_len[jnp.minimum(local, plan.prompts - 1)],
                                   plan)
    rows = (local[:, None] * plan.n + jnp.arange(plan.n)).reshape(-1)
    ended = (local[:, None] < plan.prompts) & (lengths[jnp.minimum(
        rows, plan.rows - 1)].reshape(plan.batch, plan.n) <= 1)  # rows of one token: done
    b = b.replace(status=b.status.at[jnp.where(ended.reshape(-1), rows, plan.rows)].set(
                      DONE, mode="drop"),
                  prompt_left=b.prompt_left.at[local].add(-jnp.sum(ended, 1), mode="drop"))
    return release_prompts(b, plan), overflow

  def body(carry):
    b, (steps, busy, peak, preempted, prefills, overflow, kernel, filled) = carry
    wants = wants_prefill(b, plan)
    b, over = jax.lax.cond(wants, prefill, lambda b: (b, jnp.zeros((), bool)), b)
    books, started, _ = refill_all(jax.tree.map(lambda x: x[None], b), plan)
    books, _, victim, over2 = pages_all(books, started, plan)
    b = jax.tree.map(lambda x: x[0], books)
    live = b.active
    reads = jnp.where(live, b.lengths + 1, 0)
    ended = live & (b.t + 1 >= lengths[b.row])
    b = jax.tree.map(lambda x: x[0], finish_all(books, b.last[None], ended[None], plan))
    read = paged_attention.kernel_reads(reads, live, plan.page_size, plan.read.block)
    return b, (steps + 1, busy + jnp.sum(live.astype(jnp.int32)),
               jnp.maximum(peak, jnp.sum((b.refs > 0).astype(jnp.int32))),
               preempted + jnp.sum(victim.astype(jnp.int32)), prefills + wants.astype(jnp.int32),
               overflow | (over | over2).astype(jnp.int32),
               kernel + jnp.sum(read).astype(jnp.float32),
               filled + jnp.sum(reads).astype(jnp.float32))

  go_on = lambda carry: jnp.any(carry[0].status != DONE) & (carry[1][0] < max_steps)
  return jax.lax.while_loop(go_on, body, (book, counts))[1]


def simulate(plan: Plan, prompt_len: np.ndarray, lengths: np.ndarray) -> dict:
  """One shard of `plan` decoding rows of the given lengths [Rl] (prompts of `prompt_len` [Bl]
  real tokens) with the engine's own admission, allocation, preemption and release; no model:
  a row ends at its length. Returns the decode steps, the rows in flight on average, the peak
  pages in use (and its share of the pool), the preemptions, the prefills, and the kernels' KV
  read: over the positions attended, and per live row and step."""
  counts = _simulate(jnp.asarray(prompt_len, jnp.int32), jnp.asarray(lengths, jnp.int32),
                     plan=plan, max_steps=4 * int(np.sum(lengths)) + 16)
  steps, busy, peak, preempted, prefills, overflow, kernel, filled = (float(x) for x in counts)
  if overflow:
    raise RuntimeError(f"pages.simulate: a live row found no free page ({plan})")
  return {"decode_steps": int(steps), "rows_in_flight": busy / max(steps, 1.0),
          "peak_pages": int(peak), "peak_pool_share": peak / plan.pages,
          "preemptions": int(preempted), "prefills": int(prefills),
          "kv_read_over_filled": kernel / max(filled, 1.0),
          "kv_read_per_row_step": kernel / max(busy, 1.0)}
