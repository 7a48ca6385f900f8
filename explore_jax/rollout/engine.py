"""Continuous-batching rollouts: a fixed set of decode slots, each refilled as soon as its row ends.

The static sampler (`explore_jax.rollout.sampling`) decodes all rows of a batch until its last row ends,
so with long-tailed response lengths most of its row-steps are spent on finished rows. Here `S`
decode slots share one KV cache [S, K, P + N, H] whose write index is per row; when a slot's row
emits EOS or reaches max_new_tokens, the host gives the slot the next pending (prompt, sample) row:
the prompt's prefill is copied into the slot and decoding goes on with no wave boundary.

Flow of `run` (host loop; every decision is a function of replicated data, so every process of a
multi-host run makes the same one):
  1. Prefill in fixed batches of F = ceil(S / n) prompts into a ring of 2F prompt caches (the pool):
     the n samples of a prompt share its prefill. Rows are taken in prompt-major order, so at most
     two prefill batches are live at once.
  2. `_insert` (jitted, state donated): copy the pool entries of the next rows into the free slots,
     sample each row's first token from the prompt's last logits, write it to the output buffers.
     Insert sizes are powers of two (padding entries are dropped), so few shapes compile.
  3. `_decode_chunk` (jitted, state donated): decode steps in a `lax.while_loop`. The host sizes
     the chunk's cache read for `chunk` steps ahead: each row's filled blocks only
     (`models/decode_attention.py`; a bound on the blocks, from the slots' lengths, in few
     buckets), or with kv_block=0 a view of the cache's first `view` slots (the static sampler's
     segment end above the longest row in flight). The loop runs on while every live row's next
     step fits that read, until a share of the slots (`refill_share`) is free while rows are
     pending, or past `chunk` steps any slot is (no free slot waits longer for its refill); with
     none pending, until half the live rows have ended (the host then shrinks the read). So at
     fixed lengths a chunk is a whole segment, as in the static sampler, and each chunk end (a
     host round trip) is a refill or a change of read. Each step writes every live
     slot's token, log-prob and entropy at (its row, its position) of the [R, N] output buffers;
     a slot stops when its row ends. The chunk returns the slots' state, replicated, in one array
     for the host to schedule from.
  4. The Rollout is read off the output buffers (`sampling.rollout_from_buffers`, as the static
     sampler's): the same layout and values.

Randomness is that of `sampling` (`row_keys`, `step_keys`): a row's draws depend on (rng, prompt
index, sample index, position) only, so both engines draw the same tokens from the same rng.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from explore_jax.models import decode_attention, qwen2
from explore_jax.models.qwen2 import KVCache, Params, Qwen2Config
from explore_jax.rollout import sampling
from explore_jax.tpu.sharding import logical_sharding

Array = jax.Array

KV_BLOCK = 64  # slots per block of the ragged decode attention (run's kv_block)
# A chunk ends once this share of the slots is free (run's refill_share). Each chunk end costs a
# host round trip: on the demo's model (steps of 0.5 ms; benchmarks/rollout_engine.py) 0.25 ran
# 0.81-0.84x of static against 0.77-0.79x at 0.125; on RL-like long-tailed lengths 2.07x against
# 2.13x with the view read (utilization 0.71 against 0.74), about the spread between runs
# (measured before a free slot's wait was bounded by `chunk` steps; with it, 0.73 at 0.25).
REFILL_SHARE = 0.25
# A chunk reads its rows' filled blocks (ragged) only where that reads under 1 / RAGGED_COST of
# the view: per position read, the ragged attention's gather and small per-block products ran
# 2 to 3x slower than a dense read on CPU (32 rows, 2 kv heads, head dim 32, 160 slots, blocks of
# 16 to 64: 0.9-1.2 ms against 0.34-0.45 ms for the dense read of all slots).
RAGGED_COST = 2.5


@flax.struct.dataclass
class Pool:
  """Prefilled prompts, Q = 2F entries; prompt i lives in entry i mod Q."""
  cache: KVCache  # k/v per layer [Q, K, P, H], mask [Q, P]
  logits: Array  # [Q, V] f32: the last prompt token's logits
  lengths: Array  # [Q] int32: real prompt tokens (the RoPE position of the first response token)


@flax.struct.dataclass
class EngineState:
  cache: KVCache  # k/v per layer [S, K, P + N, H], mask [S, P + N], index [S]
  last: Array  # [S] int32: the last sampled token of the slot's row
  positions: Array  # [S] int32: its RoPE position
  t: Array  # [S] int32: tokens the slot's row has sampled so far
  row: Array  # [S] int32: the output row the slot fills
  keys: Array  # [S] the row keys
  active: Array  # [S] bool: the slot holds a row still generating
  tokens: Array  # [R, N] int32 output buffers, as sampling.Rollout
  logprobs: Array  # [R, N] f32
  entropy: Array  # [R, N] f32
  lengths: Array  # [R] int32
  eos: Array  # [R] bool: the row ended with EOS
  busy: Array  # [] int32: live slot-steps of the current chunk


def state_shardings(s: EngineState, mesh: Mesh) -> EngineState:
  """Slots and output rows (their tokens, lengths, ...) over the data axes, kv heads over
  `tensor`; the per-slot scalars replicated (what `_constrain` pins, and what
  `explore_jax.aot` gives its abstract states)."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  named = lambda names: lambda x: logical_sharding(names, x.shape, mesh)
  c = s.cache
  cache = c.map(named(qwen2.CACHE_AXES)).replace(
      mask=named(("cache_batch", "cache_length"))(c.mask), index=rep)
  rows = named(("batch", None))
  return jax.tree.map(lambda _: rep, s).replace(
      cache=cache, tokens=rows(s.tokens), logprobs=rows(s.logprobs), entropy=rows(s.entropy),
      lengths=named(("batch",))(s.lengths), eos=named(("batch",))(s.eos))


def pool_shardings(pool: Pool, mesh: Mesh) -> Pool:
  """Prompt caches with kv heads over `tensor` (what `_prefill` pins); the rest replicated."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  heads = lambda x: logical_sharding((None, "kv_heads", None, None), x.shape, mesh)
  return jax.tree.map(lambda _: rep, pool).replace(
      cache=pool.cache.replace(mask=rep, index=rep).map(heads))


def _constrain(s: EngineState, mesh: Mesh | None) -> EngineState:
  """The cache and the output rows pinned to `state_shardings` (rows the way the trainer reads
  each process's share of them, `train.local_rows`)."""
  if mesh is None:
    return s
  sh = state_shardings(s, mesh)
  pin = jax.lax.with_sharding_constraint
  cache = s.cache.replace(k=tuple(map(pin, s.cache.k, sh.cache.k)),
                          v=tuple(map(pin, s.cache.v, sh.cache.v)),
                          mask=pin(s.cache.mask, sh.cache.mask))
  return s.replace(cache=cache, tokens=pin(s.tokens, sh.tokens),
                   logprobs=pin(s.logprobs, sh.logprobs), entropy=pin(s.entropy, sh.entropy),
                   lengths=pin(s.lengths, sh.lengths), eos=pin(s.eos, sh.eos))


def _replicate(x, mesh):
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _record(s: EngineState, logits, token_keys, sampler, eos_id, max_new_tokens, live):
  """Sample the next token of every live slot from logits [S, V]; write it at (row, t)."""
  token = sampler.next_token(logits, token_keys)
  logp, entropy = sampling.token_stats(logits, token)
  rows_out = s.tokens.shape[0]
  row = jnp.where(live, s.row, rows_out)  # dead slots write out of bounds: dropped
  put = lambda buf, x: buf.at[row, s.t].set(x.astype(buf.dtype), mode="drop")
  ended = token == eos_id
  return s.replace(
      tokens=put(s.tokens, token), logprobs=put(s.logprobs, logp),
      entropy=put(s.entropy, entropy),
      lengths=s.lengths.at[row].set(s.t + 1, mode="drop"),
      eos=s.eos.at[row].set(ended, mode="drop"),
      last=jnp.where(live, token, s.last),
      t=jnp.where(live, s.t + 1, s.t),
      active=jnp.where(live, ~ended & (s.t + 1 < max_new_tokens), s.active))


@functools.partial(jax.jit, static_argnames=("config", "mesh"), donate_argnames=("pool",))
def _prefill(params, pool: Pool, tokens, mask, first, *, config, mesh) -> Pool:
  """Prefill prompts tokens/mask [F, P] into pool entries first .. first + F - 1."""
  f, p = tokens.shape
  cache = qwen2.init_cache(config, f, p)
  logits, cache = qwen2.apply_with_cache(params, tokens, qwen2.positions_from_mask(mask), mask,
                                         cache, config)
  put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), first, 0)
  new = pool.cache.replace(k=tuple(map(put, pool.cache.k, cache.k)),
                           v=tuple(map(put, pool.cache.v, cache.v)),
                           mask=put(pool.cache.mask, cache.mask))
  if mesh is not None:
    pin = pool_shardings(pool, mesh).cache
    new = new.replace(k=tuple(map(jax.lax.with_sharding_constraint, new.k, pin.k)),
                      v=tuple(map(jax.lax.with_sharding_constraint, new.v, pin.v)))
  return Pool(cache=new, logits=put(pool.logits, logits[:, -1]),
              lengths=put(pool.lengths, jnp.sum(mask, axis=-1).astype(jnp.int32)))


@functools.partial(jax.jit, static_argnames=("sampler", "max_new_tokens", "mesh"),
                   donate_argnames=("state",))
def _insert(state: EngineState, pool: Pool, rng, eos_id, slot, entry, row, prompt_index,
            sample_index, *, sampler, max_new_tokens, mesh) -> EngineState:
  """Start rows `row` [M] (prompt_index, sample_index) in slots `slot` [M] from pool entries
  `entry` [M]; padding entries have slot = S and are dropped."""
  s = state
  p = pool.cache.mask.shape[1]
  c = s.cache
  put_kv = lambda buf, x: buf.at[slot, :, :p].set(x[entry], mode="drop")
  mask_rows = jnp.zeros((slot.shape[0], c.mask.shape[1]), bool).at[:, :p].set(pool.cache.mask[entry])
  cache = c.replace(k=tuple(map(put_kv, c.k, pool.cache.k)),
                    v=tuple(map(put_kv, c.v, pool.cache.v)),
                    mask=c.mask.at[slot].set(mask_rows, mode="drop"),
                    index=c.index.at[slot].set(p, mode="drop"))
  keys = sampling.row_keys(rng, prompt_index, sample_index)  # [M]
  set_ = lambda buf, x: buf.at[slot].set(x, mode="drop")
  s = s.replace(cache=cache, positions=set_(s.positions, pool.lengths[entry]),
                t=set_(s.t, jnp.zeros_like(slot)), row=set_(s.row, row),
                keys=s.keys.at[slot].set(keys, mode="drop"),
                active=set_(s.active, jnp.ones(slot.shape, bool)))
  # The first token of each new row, from its prompt's logits, as in the static prefill.
  inserted = jnp.zeros(s.active.shape, bool).at[slot].set(True, mode="drop")
  logits = jnp.zeros((s.active.shape[0], pool.logits.shape[1]), jnp.float32).at[slot].set(
      pool.logits[entry], mode="drop")
  s = _record(s, logits, sampling.step_keys(s.keys, s.t), sampler, eos_id, max_new_tokens,
              inserted)
  return _constrain(s, mesh)


@functools.partial(jax.jit, static_argnames=("config", "sampler", "view", "ragged", "mesh"),
                   donate_argnames=("state",))
def _decode_chunk(params, state: EngineState, eos_id, refill_at, horizon, *, config, sampler,
                  view, ragged, mesh):
  """Decode steps while every live row's next step fits the chunk's read (the first `view` slots
  of every row, or with `ragged` each row's filled blocks, at most `ragged.blocks`), fewer than
  `refill_at` slots are free, and (past `horizon` steps) none is."""
  max_new_tokens = state.tokens.shape[1]
  full = state.cache
  length = full.mask.shape[1]
  if ragged is not None:
    state = state.replace(cache=full.replace(ragged=ragged))
  elif view < length:  # attend over the first `view` slots only (every live row fits in them)
    state = state.replace(cache=full.map(lambda x: x[:, :, :view]).replace(mask=full.mask[:, :view]))

  def index(s):
    # A dead slot reads and writes from index 0: its writes land in its own, unused row of the
    # cache, and a ragged read gives it one block, as the host counts it. (Its row's index would
    # give it all that row's blocks: a row that ended on a chunk's last step or with its first
    # token still holds it.)
    return jnp.where(s.active, s.cache.index, 0)

  def body(carry):
    i, s = carry
    live = s.active
    s = s.replace(cache=s.cache.replace(index=index(s)))
    logits, cache = sampling.decode_logits(params, config, s.cache, s.last, s.positions)
    s = s.replace(cache=cache, positions=jnp.where(live, s.positions + 1, s.positions),
                  busy=s.busy + jnp.sum(live.astype(jnp.int32)))
    s = _record(s, logits, sampling.step_keys(s.keys, s.t), sampler, eos_id, max_new_tokens, live)
    return i + 1, _constrain(s, mesh)

  def go_on(carry):
    s = carry[1]
    # The step writes slot `index` and attends slots 0 .. index of its row.
    fits = (decode_attention.fits(index(s), ragged) if ragged is not None
            else jnp.all(index(s) < view))
    free = jnp.sum(~s.active)
    return jnp.any(s.active) & (free < refill_at) & ((carry[0] < horizon) | (free == 0)) & fits

  steps, state = jax.lax.while_loop(go_on, body, (jnp.zeros((), jnp.int32),
                                                   state.replace(busy=jnp.zeros((), jnp.int32))))
  if ragged is not None:
    state = state.replace(cache=state.cache.replace(ragged=None))
  elif view < length:
    put = lambda x, y: jax.lax.dynamic_update_slice(x, y, (0,) * x.ndim)
    state = state.replace(cache=full.replace(
        k=tuple(map(put, full.k, state.cache.k)), v=tuple(map(put, full.v, state.cache.v)),
        mask=put(full.mask, state.cache.mask), index=state.cache.index))
  state = _constrain(state, mesh)
  # What the host schedules from, on every process, in one transfer: the slots' states, then
  # the chunk's decode steps and live slot-steps.
  return state, _replicate(jnp.concatenate([state.active.astype(jnp.int32), state.t,
                                            jnp.stack([steps, state.busy])]), mesh)


def _host(x) -> np.ndarray:
  """A replicated array's value (its first local shard holds all of it)."""
  return np.asarray(x.addressable_shards[0].data)


def _pow2(x: int, cap: int) -> int:
  return min(cap, 1 << max(0, int(x) - 1).bit_length())


def _bucket(x: int, cap: int) -> int:
  """x rounded up to 2^k or 3 * 2^(k-1) (at most a third more; few shapes compile), <= cap."""
  up = _pow2(x, 1 << 62)
  return min(cap, 3 * up // 4 if 3 * up // 4 >= x else up)


def full_ragged(state: EngineState, kv_block: int, mesh: Mesh | None
                ) -> decode_attention.Ragged | None:
  """The ragged read of a decode step with every slot full (None: kv_block 0, a dense read).
  On a mesh, `blocks` counts one device's share of the slots (contiguous, as the cache is split)."""
  if not kv_block:
    return None
  k = state.cache.k[0]
  slots, length = k.shape[0], k.shape[2]
  block = min(kv_block, length)
  spec, local = None, slots
  if mesh is not None:
    sh = state_shardings(state, mesh).cache.k[0]
    spec, local = sh.spec, sh.shard_shape(k.shape)[0]
  return decode_attention.Ragged(local * -(-length // block), block, mesh, spec)


def empty_state(config: Qwen2Config, slots: int, rows: int, prompt_len: int,
                max_new_tokens: int, rng, eos_id: int) -> EngineState:
  """`slots` idle slots over a [slots, K, P + N, H] cache; output buffers for `rows` rows."""
  cache = qwen2.init_cache(config, slots, prompt_len + max_new_tokens)
  cache = cache.replace(index=jnp.zeros((slots,), jnp.int32))
  shp = lambda *s: jnp.zeros(s, jnp.int32)
  return EngineState(
      cache=cache, last=shp(slots), positions=shp(slots), t=shp(slots), row=shp(slots),
      keys=jax.random.split(rng, slots), active=jnp.zeros((slots,), bool),
      tokens=jnp.full((rows, max_new_tokens), eos_id, jnp.int32),
      logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
      entropy=jnp.zeros((rows, max_new_tokens), jnp.float32),
      lengths=shp(rows), eos=jnp.zeros((rows,), bool), busy=shp())


def empty_pool(config: Qwen2Config, entries: int, prompt_len: int) -> Pool:
  return Pool(cache=qwen2.init_cache(config, entries, prompt_len),
              logits=jnp.zeros((entries, config.vocab_size), jnp.float32),
              lengths=jnp.zeros((entries,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "slots", "rows", "prompt_len",
                                             "max_new_tokens", "entries", "mesh"))
def _start(rng, eos_id, *, config, slots, rows, prompt_len, max_new_tokens, entries, mesh
           ) -> tuple[EngineState, Pool]:
  """The idle engine and an empty pool, built in one call (op by op, their dozens of small
  arrays took about 2% of a one-wave run on CPU)."""
  state = empty_state(config, slots, rows, prompt_len, max_new_tokens, rng, eos_id)
  pool = empty_pool(config, entries, prompt_len)
  if mesh is not None:
    pool = jax.tree.map(jax.lax.with_sharding_constraint, pool, pool_shardings(pool, mesh))
  return _constrain(state, mesh), pool


def prefill_batch(slots: int, n: int) -> int:
  """Prompts per prefill batch: one batch covers any refill of the slots."""
  return -(-slots // n)


def _chunk_read(active: np.ndarray, t: np.ndarray, *, prompt_len: int, chunk: int,
                max_new_tokens: int, ends: list[int], full):
  """What the next chunk's decode attention reads: (view, ragged blocks or None, KV positions a
  step reads). The view: the cache slots the longest live row attends at the chunk's last step
  (a row of t tokens has written prompt_len + t - 1 slots; a step writes one and attends them
  all), rounded up to a segment end. With `full` (`full_ragged`; None with kv_block 0), the ragged
  read replaces the view where it reads under 1 / RAGGED_COST of it."""
  slots, p = len(active), prompt_len
  longest = int(np.max(np.where(active, t, 0))) + chunk - 1
  view = p + next(e for e in ends + [max_new_tokens] if e >= min(longest, max_new_tokens))
  if full is None:
    return view, None, slots * view
  # Each slot's filled length at the chunk's last step (a dead slot reads one block), the flat
  # block entries that needs on the fullest device, rounded up to few shapes.
  filled_end = np.where(active, np.minimum(p + t + chunk - 1, p + max_new_tokens), 1)
  need = decode_attention.blocks_needed(filled_end, full.block, full.shards)
  blocks = _bucket(need, full.blocks)
  if blocks * full.block * full.shards * RAGGED_COST < slots * view:
    return view, dataclasses.replace(full, blocks=blocks), blocks * full.block * full.shards
  return view, None, slots * view


def run(config: Qwen2Config, params: Params, prompt_tokens, prompt_mask, rng, *,
        max_new_tokens: int, sampler: sampling.Sampler, eos_id: int, n: int, slots: int,
        chunk: int, buckets: int, prompt_index, sample_offset: int = 0,
        mesh: Mesh | None = None, kv_block: int = KV_BLOCK, refill_share: float = REFILL_SHARE
        ) -> tuple[sampling.Rollout, dict]:
  """Rollout of n samples per prompt [B, P] through `slots` decode slots; (Rollout, stats).

  chunk: the decode steps ahead a chunk's cache read is sized for (it runs on while its rows fit
  that read), and the most steps a free slot waits for its refill. kv_block: the decode attention
  reads each row's filled blocks of this many slots (`decode_attention`) in the chunks where that
  reads under 1 / RAGGED_COST of the view; 0 always reads a `view` of every row (a bucket above
  the longest row in flight, as the static sampler's segments). refill_share: a chunk ends once
  this share of the slots is free and rows are pending."""
  b, p = prompt_tokens.shape
  rows = b * n
  slots = slots or rows
  if slots < 1 or chunk < 1 or kv_block < 0 or not 0.0 < refill_share <= 1.0:
    raise ValueError(f"rollout engine: slots={slots} and chunk={chunk} must be >= 1, "
                     f"kv_block={kv_block} >= 0, refill_share={refill_share} in (0, 1]")
  tokens_h = np.asarray(sampling_host(prompt_tokens), np.int32)
  mask_h = np.asarray(sampling_host(prompt_mask), np.int32)
  f = prefill_batch(slots, n)
  eos = jnp.int32(eos_id)
  state, pool = _start(rng, eos, config=config, slots=slots, rows=rows, prompt_len=p,
                       max_new_tokens=max_new_tokens, entries=2 * f, mesh=mesh)
  prefilled = 0  # prompts [0, prefilled) have been prefilled
  next_row = 0
  active, t = np.zeros(slots, bool), np.zeros(slots, np.int32)
  ends = sampling._segment_ends(max_new_tokens, buckets)
  chunks = steps = busy = ragged_chunks = 0
  read = 0.0  # KV positions the decode's attention read
  full = full_ragged(state, kv_block, mesh)  # every slot full: the most a chunk can read
  while True:
    free = np.nonzero(~active)[0]
    take = min(len(free), rows - next_row)
    if take:
      last_prompt = (next_row + take - 1) // n
      while prefilled <= last_prompt:
        ids = np.minimum(np.arange(prefilled, prefilled + f), b - 1)
        pool = _prefill(params, pool, tokens_h[ids], mask_h[ids], jnp.int32(prefilled % (2 * f)),
                        config=config, mesh=mesh)
        prefilled += f
      m = _pow2(take, slots)
      new_rows = np.arange(next_row, next_row + take)
      pad = lambda x, fill: np.concatenate([x, np.full(m - take, fill, np.int32)]).astype(np.int32)
      prompt_of = new_rows // n
      state = _insert(state, pool, rng, eos, pad(free[:take], slots),
                      pad(prompt_of % (2 * f), 0), pad(new_rows, rows),
                      pad(np.asarray(prompt_index)[prompt_of], 0),
                      pad(sample_offset + new_rows % n, 0), sampler=sampler,
                      max_new_tokens=max_new_tokens, mesh=mesh)
      next_row += take
      active[free[:take]] = True
      t[free[:take]] = 1
    if not active.any() and next_row == rows:
      break
    pending = rows - next_row
    # A chunk ends for the host to refill once a share of the slots is free; with no row pending,
    # once half the live rows have ended, for the host to shrink the ragged read to the rest.
    # Past `chunk` steps it also ends for a free slot while rows are pending (no slot waits
    # longer than that for its refill; with none free, as at fixed lengths, it runs on).
    free_now = slots - int(active.sum())
    refill_at = jnp.int32(max(1, min(int(refill_share * slots), pending)) if pending
                          else free_now + -(-(slots - free_now) // 2))
    horizon = jnp.int32(chunk if pending else max_new_tokens)
    view, ragged, read_per_step = _chunk_read(active, t, prompt_len=p, chunk=chunk,
                                              max_new_tokens=max_new_tokens, ends=ends,
                                              full=full)
    ragged_chunks += ragged is not None
    state, sched = _decode_chunk(params, state, eos, refill_at, horizon, config=config,
                                 sampler=sampler, view=view, ragged=ragged, mesh=mesh)
    sched = _host(sched)
    # A chunk runs no step when rows ended with their first token (the host learns of it here);
    # with nothing to learn, the host's bound and the device's count of the read disagree.
    if sched[-2] == 0 and np.array_equal(sched[:slots].astype(bool), active):
      raise RuntimeError(f"rollout engine: a chunk ran no step (view {view}, ragged {ragged}, "
                         f"slots' tokens {t[active].tolist()})")
    active, t = sched[:slots].astype(bool), sched[slots:2 * slots].copy()
    chunks, steps, busy = chunks + 1, steps + int(sched[-2]), busy + int(sched[-1])
    read += float(sched[-2]) * read_per_step
  # A row of length l had l - 1 decode steps (its first token came with its prefill), the j-th
  # of which attended its P prompt slots and j response slots.
  done = np.asarray(sampling_host(state.lengths), np.float64) - 1
  filled = float(np.sum(done * p + done * (done + 1) / 2))
  rollout = sampling.rollout_from_buffers(state.tokens, state.logprobs, state.entropy,
                                          state.lengths, state.eos, prompt_tokens, prompt_mask,
                                          n=n)
  stats = {"slot_steps": steps * slots, "busy_slot_steps": busy, "decode_steps": steps,
           "chunks": chunks, "ragged_chunks": ragged_chunks,
           "slot_utilization": busy / max(steps * slots, 1),
           # How much more KV cache the decode read than one reading each row's filled length.
           "kv_read_positions": read, "kv_filled_positions": filled,
           "kv_read_over_filled": read / max(filled, 1.0)}
  return rollout, stats


def sampling_host(x) -> np.ndarray:
  """Prompts as numpy on every process (they are small)."""
  from explore_jax.tpu import sharding
  return sharding.to_host(x)


def generate(*args, **kw) -> sampling.Rollout:
  return run(*args, **kw)[0]
