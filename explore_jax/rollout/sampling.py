"""Rollout sampler: prefill once, then decode inside one jitted `lax.while_loop` over a KV cache.

Shape letters as in `explore_jax.models.qwen2`, plus: P prompt length (left-padded), N new tokens
(`max_new_tokens`), R rows of the rollout (R = B * n), C candidates kept by top-k.

Flow of `generate`:
  1. `_prefill` (jitted): the B prompts go through the model once, writing slots 0..P-1 of a cache
     of P + N slots. The cache, the last logits and the per-row prompt lengths are repeated n times
     in prompt-major order: rows i*n .. i*n+n-1 answer prompt i (GRPO groups are consecutive rows).
     The first token of every row is sampled from the prefill logits.
  2. `_decode` (jitted, state donated): a `lax.while_loop` over a pure step that feeds the last
     token at slot P + t and position len_i + t (so a left-padded row sees the positions of its
     unpadded sequence), samples the next token and writes it, its log-probability and the entropy
     into [R, N] buffers with `dynamic_update_slice`. The loop stops as soon as every row is done.
     All of its buffers are loop carries, so XLA updates the cache in place.
  3. The Rollout is read off the final state.

Log-probabilities and entropies are those of the policy itself (the raw logits, temperature 1),
whatever the sampling temperature / top-k / top-p: they are what the RL losses need (H_t of the
paper). After a row's EOS its tokens are `eos_id` (padding), with mask, logprob and entropy 0.

Randomness is per row: the draw of response position t of sample j of prompt i uses the key
`fold_in(fold_in(fold_in(rng, prompt_index[i]), j), t)` (`row_keys`, `step_keys`), and every choice
the samplers make is made row by row. So a row's tokens depend only on (rng, its prompt's index,
its sample index), never on its batch mates or on when it was scheduled: the static sampler and
the continuous engine (`explore_jax.rollout.engine`) draw the same tokens from the same rng.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from explore_jax.models import qwen2
from explore_jax.models.qwen2 import KVCache, Params, Qwen2Config
from explore_jax.tpu.sharding import logical_sharding

Array = jax.Array

FINISH_EOS = 0  # the row emitted eos_id (the EOS token is the last masked-in token)
FINISH_LENGTH = 1  # the row reached max_new_tokens without EOS
NO_EOS = -1  # eos_id that no token equals: every row generates exactly max_new_tokens

# Top-p alone over a vocabulary of at least _CANDIDATES_MIN_VOCAB: look for the nucleus among the
# _TOP_P_CANDIDATES highest logits first (one `top_k` costs less than the 31 bisection passes of
# `_top_p_threshold` there); if their mass reaches top_p in every row, no other token can be in the
# nucleus, so the result is exact. On CPU the bisection wins below a few thousand tokens.
_TOP_P_CANDIDATES = 64
_CANDIDATES_MIN_VOCAB = 4096
# Draws over at least this many logits go through `_categorical_blocked` (see there).
_BLOCKED_MIN_VOCAB = 256


# --------------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Temperature, then top-k, then top-p, as transformers' logits warpers apply them.

  temperature == 0 is greedy (argmax of the raw logits, first index on ties). top_k == 0 and
  top_p == 1 switch the respective truncation off. Hashable: a static jit argument.
  Nothing here sorts the vocabulary (a sort of [R, V] is slow on CPU and unnecessary):
  top-k uses `lax.top_k`, and top-p a threshold found by bisection (`_top_p_threshold`).
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 switches it off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def next_token(self, logits: Array, keys: Array) -> Array:
    """logits [R, V] float32, one key per row [R] -> sampled token ids [R] int32. A row's token
    depends only on its own logits and key."""
    if self.greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / self.temperature
    vocab = logits.shape[-1]
    if 0 < self.top_k < vocab:
      # Only the k best survive top-k, so top-p (on the renormalised top-k distribution) and the
      # draw happen on [R, C].
      values, ids = jax.lax.top_k(logits, self.top_k)  # [R, C], descending
      if self.top_p < 1:
        values = _nucleus(values, jax.nn.logsumexp(values, axis=-1, keepdims=True), self.top_p)
      return _take(ids, _categorical(keys, values))
    if self.top_p < 1:
      return _sample_top_p(logits, keys, self.top_p)
    return _categorical(keys, logits)


def row_keys(rng: Array, prompt_index: Array, sample_index: Array) -> Array:
  """One key per row [R] from its prompt's index [R] and its sample index [R]."""
  fold = jax.vmap(jax.random.fold_in, in_axes=(0, 0))
  return fold(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, prompt_index), sample_index)


def step_keys(keys: Array, position: Array) -> Array:
  """The keys [R] of response position `position` ([] or [R]) of each row."""
  return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(position, keys.shape[:1]))


def _take(ids: Array, choice: Array) -> Array:
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _categorical(keys: Array, logits: Array) -> Array:
  """One draw per row of logits [R, V], row r from keys[r]."""
  if logits.shape[-1] >= _BLOCKED_MIN_VOCAB:
    draw = lambda key, row: _categorical_blocked(key, row[None])[0]
  else:
    draw = lambda key, row: jax.random.categorical(key, row)
  return jax.vmap(draw)(keys, logits).astype(jnp.int32)


def _categorical_blocked(rng: Array, logits: Array) -> Array:
  """Exact categorical draw over [R, V] from about 2 sqrt(V) random numbers per row.

  P(token) = P(its block) * P(token | block): pick one of ~sqrt(V) blocks by its total mass
  (logsumexp), then a token inside it. `jax.random.categorical` would draw V Gumbels per row;
  generating those random bits dominates a decode step on CPU for a 32k+ vocabulary.
  """
  rows, vocab = logits.shape
  width = math.isqrt(vocab - 1) + 1
  blocks = -(-vocab // width)
  padded = jnp.pad(logits, ((0, 0), (0, blocks * width - vocab)), constant_values=-jnp.inf)
  padded = padded.reshape(rows, blocks, width)  # [R, blocks, width]
  block_key, token_key = jax.random.split(rng)
  block = jax.random.categorical(block_key, jax.nn.logsumexp(padded, axis=-1), axis=-1)  # [R]
  inside = jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0]  # [R, width]
  return (block * width + jax.random.categorical(token_key, inside, axis=-1)).astype(jnp.int32)


def _nucleus(sorted_logits: Array, log_norm: Array, top_p: float) -> Array:
  """Mask the descending-sorted logits outside the nucleus with -inf.

  A token is kept when the probability mass of the tokens ranked above it is < top_p (the rule of
  transformers' TopPLogitsWarper; the top token is always kept). `log_norm` [R, 1] normalises the
  probabilities over the whole distribution the candidates come from.
  """
  probs = jnp.exp(sorted_logits - log_norm)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_above < top_p
  keep = keep.at[:, 0].set(True)
  return jnp.where(keep, sorted_logits, -jnp.inf)


def _top_p_threshold(probs: Array, top_p: float) -> Array:
  """The smallest kept probability of the nucleus, [R, 1], without sorting.

  Token v is kept iff G(p_v) < top_p, where G(x) = sum of the p_u > x; G does not increase, so the
  kept set is {v : p_v >= x*} with x* the smallest float32 such that G(x*) < top_p. Non-negative
  floats are ordered like their int32 bit patterns, so 31 bisection steps on the bits find x*
  exactly (up to the summation order of G).
  """
  as_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]
  hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32)  # G(max) = 0 < top_p
  lo = jnp.zeros_like(hi)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    below = jnp.sum(jnp.where(probs > as_float(mid), probs, 0.0), axis=-1) < top_p
    return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

  _, hi = jax.lax.fori_loop(0, 31, halve, (lo, hi))
  return as_float(hi)


def _sample_top_p(logits: Array, keys: Array, top_p: float) -> Array:
  """Nucleus sampling over the whole vocabulary; each row takes its own path (below)."""
  vocab = logits.shape[-1]
  log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [R, 1]

  def from_threshold(_):
    probs = jnp.exp(logits - log_norm)
    kept = probs >= _top_p_threshold(probs, top_p)
    return _categorical(keys, jnp.where(kept, logits, -jnp.inf))

  if vocab < max(_CANDIDATES_MIN_VOCAB, _TOP_P_CANDIDATES + 1):
    return from_threshold(None)
  values, ids = jax.lax.top_k(logits, _TOP_P_CANDIDATES)  # [R, C]
  covered = jnp.sum(jnp.exp(values - log_norm), axis=-1) >= top_p  # [R]

  def from_candidates(_):
    return _take(ids, _categorical(keys, _nucleus(values, log_norm, top_p)))

  def per_row(_):
    return jnp.where(covered, from_candidates(None), from_threshold(None))

  # A row draws from its candidates when they cover its nucleus, else from its threshold: a
  # choice per row, so its token does not depend on the other rows. The batch-wide cond only
  # skips the threshold pass when no row needs it (a peaked distribution, temperature < 1).
  return jax.lax.cond(jnp.all(covered), from_candidates, per_row, None)


def token_stats(logits: Array, tokens: Array) -> tuple[Array, Array]:
  """Log-probability of `tokens` [R] and entropy under softmax(logits [R, V]) at temperature 1."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [R, V]
  chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return chosen, entropy


# --------------------------------------------------------------------------------------------------
# Rollout and decode state
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Rollout:
  tokens: Array  # [R, N] int32; eos_id after each row's EOS
  logprobs: Array  # [R, N] f32; log pi(token) at temperature 1; 0 where mask is 0
  entropy: Array  # [R, N] f32; entropy of pi at temperature 1 (H_t); 0 where mask is 0
  mask: Array  # [R, N] int32; 1 for generated tokens including the EOS itself
  lengths: Array  # [R] int32; number of generated tokens including EOS
  finish_reason: Array  # [R] int32; FINISH_EOS or FINISH_LENGTH
  prompt_tokens: Array  # [R, P] int32; the left-padded prompt of each row (repeated n times)
  prompt_mask: Array  # [R, P] int32


@flax.struct.dataclass
class DecodeState:
  cache: KVCache  # B = R, S = P + N
  tokens: Array  # [R, N] int32
  logprobs: Array  # [R, N] f32
  entropy: Array  # [R, N] f32
  positions: Array  # [R] int32; RoPE position of the last sampled token
  done: Array  # [R] bool; the row has emitted EOS
  lengths: Array  # [R] int32
  step: Array  # [] int32; tokens sampled so far
  keys: Array  # [R] the row keys (`row_keys`)


def _constrain(state: DecodeState, mesh: Mesh | None) -> DecodeState:
  """Pin the batch of the cache and of the buffers to the data axes, kv heads to `tensor`."""
  if mesh is None:
    return state
  c = state.cache
  shard = lambda x, names: jax.lax.with_sharding_constraint(
      x, logical_sharding(names, x.shape, mesh))
  cache = c.map(lambda x: shard(x, qwen2.CACHE_AXES)).replace(
      mask=shard(c.mask, ("cache_batch", "cache_length")))
  rows = ("batch", None)
  return state.replace(cache=cache, tokens=shard(state.tokens, rows),
                       logprobs=shard(state.logprobs, rows), entropy=shard(state.entropy, rows))


def _record(state: DecodeState, logits: Array, sampler: Sampler, eos_id: Array) -> DecodeState:
  """Sample token number `state.step` from logits [R, V] and write it into the buffers."""
  token = sampler.next_token(logits, step_keys(state.keys, state.step))
  logp, entropy = token_stats(logits, token)
  active = ~state.done
  token = jnp.where(active, token, eos_id)
  column = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype),
                                                       (0, state.step))
  return state.replace(
      tokens=column(state.tokens, token),
      logprobs=column(state.logprobs, jnp.where(active, logp, 0.0)),
      entropy=column(state.entropy, jnp.where(active, entropy, 0.0)),
      done=state.done | (token == eos_id),
      lengths=state.lengths + active.astype(jnp.int32),
      step=state.step + 1)


def decode_logits(params: Params, config: Qwen2Config, cache: KVCache, tokens: Array,
                  positions: Array) -> tuple[Array, KVCache]:
  """One decode step: tokens [R] at positions [R] into slot cache.index -> logits [R, V]."""
  ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
  logits, cache = qwen2.apply_with_cache(params, tokens[:, None], positions[:, None], ones, cache,
                                         config)
  return logits[:, 0], cache


SEGMENTS = 4  # generate's default cache-view buckets (the static decode's pieces, the engine's views)


def _segment_ends(max_new_tokens: int, segments: int) -> list[int]:
  """Last step (exclusive) of each decode segment; the cache of segment j has P + end_j slots."""
  segments = max(1, min(segments, max_new_tokens))
  return [-(-max_new_tokens * (j + 1) // segments) for j in range(segments)]


def _with_slots(cache: KVCache, slots: int) -> KVCache:
  """The first `slots` slots of the cache (a copy, unless that is all of them)."""
  return cache.map(lambda x: x[:, :, :slots]).replace(mask=cache.mask[:, :slots])


def _write_back(full: KVCache, part: KVCache) -> KVCache:
  """Write a `_with_slots` view back into the full cache (in place: the state is donated)."""
  put = lambda x, y: jax.lax.dynamic_update_slice(x, y, (0,) * x.ndim)
  return full.replace(k=tuple(map(put, full.k, part.k)), v=tuple(map(put, full.v, part.v)),
                      mask=put(full.mask, part.mask), index=part.index)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "n", "sampler", "mesh"))
def _prefill(params, prompt_tokens, prompt_mask, rng, eos_id, prompt_index, sample_offset, *,
             config, max_new_tokens, n, sampler, mesh) -> DecodeState:
  b, p = prompt_tokens.shape
  rows = b * n
  cache = qwen2.init_cache(config, b, p + max_new_tokens)
  logits, cache = qwen2.apply_with_cache(params, prompt_tokens, qwen2.positions_from_mask(
      prompt_mask), prompt_mask, cache, config)
  # Prompt-major repetition: row i*n + j is sample j of prompt i.
  rep = lambda x, axis: jnp.repeat(x, n, axis=axis)
  cache = cache.map(lambda x: rep(x, 0)).replace(mask=rep(cache.mask, 0))
  state = DecodeState(
      cache=cache,
      tokens=jnp.full((rows, max_new_tokens), eos_id, jnp.int32),
      logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
      entropy=jnp.zeros((rows, max_new_tokens), jnp.float32),
      positions=rep(jnp.sum(prompt_mask.astype(jnp.int32), axis=-1), 0),
      done=jnp.zeros((rows,), bool),
      lengths=jnp.zeros((rows,), jnp.int32),
      step=jnp.zeros((), jnp.int32),
      keys=row_keys(rng, rep(prompt_index, 0), sample_offset + jnp.tile(jnp.arange(n), b)))
  state = _constrain(state, mesh)
  return _record(state, rep(logits[:, -1], 0), sampler, eos_id)


@functools.partial(jax.jit, static_argnames=("config", "sampler", "mesh", "segments"),
                   donate_argnames=("state",))
def _decode(params, state: DecodeState, eos_id, *, config, sampler, mesh, segments
            ) -> DecodeState:
  max_new_tokens = state.tokens.shape[1]
  prompt_len = state.cache.mask.shape[1] - max_new_tokens

  def body(s: DecodeState):
    last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)[:, 0]
    logits, cache = decode_logits(params, config, s.cache, last, s.positions)
    s = s.replace(cache=cache, positions=s.positions + 1)
    return _constrain(_record(s, logits, sampler, eos_id), mesh)

  # Attention reads every slot of the cache at every step, so the loop runs in segments over a
  # growing view of the cache: early steps attend over P + N/segments slots instead of P + N.
  # Masked slots add exact zeros, so the result does not depend on the segmentation.
  full = state.cache
  for end in _segment_ends(max_new_tokens, segments):
    state = _constrain(state.replace(cache=_with_slots(full, prompt_len + end)), mesh)
    state = jax.lax.while_loop(lambda s, end=end: (s.step < end) & ~jnp.all(s.done), body, state)
    full = _write_back(full, state.cache)
  return _constrain(state.replace(cache=full), mesh)


@functools.partial(jax.jit, static_argnames=("n",))
def rollout_from_buffers(tokens, logprobs, entropy, lengths, eos, prompt_tokens, prompt_mask, *,
                         n: int) -> Rollout:
  """The Rollout of both engines' output buffers ([R, N] tokens, log-probs, entropies; [R]
  lengths and whether the row ended with EOS) and its prompts [B, P], R = B * n rows prompt-major.
  One call: built op by op, its few small arrays took about 2% of a one-wave engine run on CPU."""
  mask = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
  repeat = lambda x: jnp.repeat(jnp.asarray(x, jnp.int32), n, axis=0)
  return Rollout(tokens=tokens, logprobs=logprobs, entropy=entropy, mask=mask, lengths=lengths,
                 finish_reason=jnp.where(eos, FINISH_EOS, FINISH_LENGTH).astype(jnp.int32),
                 prompt_tokens=repeat(prompt_tokens), prompt_mask=repeat(prompt_mask))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and mask [B, width] in the sampler's layout: padding on the left. `width`
  defaults to the longest row; every row must fit in it."""
  width = max(len(s) for s in seqs) if width is None else width
  tokens = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  for row, s in enumerate(seqs):
    if len(s) > width:
      raise ValueError(f"left_pad: row {row} has {len(s)} tokens, more than width={width}")
    tokens[row, width - len(s):] = s
    mask[row, width - len(s):] = 1
  return tokens, mask


def check_prompts(prompt_tokens, prompt_mask) -> None:
  if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
    raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} "
                     "must both be [B, P]")
  concrete = not isinstance(prompt_mask, jax.core.Tracer)
  if not concrete or not getattr(prompt_mask, "is_fully_addressable", True):
    return  # checked only where the mask is concrete and on this host
  mask = np.asarray(prompt_mask).astype(np.int32)
  bad = np.nonzero((mask[:, -1] != 1) | np.any(np.diff(mask, axis=-1) < 0, axis=-1))[0]
  if bad.size:
    raise ValueError(f"prompt_mask rows {bad[:8].tolist()} are not left-padded (0s then 1s with "
                     "at least one real token); pad prompts on the left")


def generate_static(config: Qwen2Config, params: Params, prompt_tokens: Array, prompt_mask: Array,
                    rng: Array, *, max_new_tokens: int, sampler: Sampler, eos_id: int, n: int,
                    mesh: Mesh | None, segments: int, prompt_index: np.ndarray,
                    sample_offset: int) -> tuple[Rollout, dict]:
  """All rows at once: prefill, then one decode loop until the longest row ends (in `segments`
  pieces over a growing view of the cache). Called through `explore_jax.rollout.generate`, which
  checks the arguments. Returns (Rollout, stats) with stats["slot_utilization"] = generated tokens
  / decode row-steps (the static sampler's slots are its rows)."""
  state = _prefill(params, jnp.asarray(prompt_tokens, jnp.int32),
                   jnp.asarray(prompt_mask, jnp.int32), rng, jnp.int32(eos_id), prompt_index,
                   jnp.int32(sample_offset), config=config, max_new_tokens=max_new_tokens, n=n,
                   sampler=sampler, mesh=mesh)
  state = _decode(params, state, jnp.int32(eos_id), config=config, sampler=sampler, mesh=mesh,
                  segments=segments)
  rollout = rollout_from_buffers(state.tokens, state.logprobs, state.entropy, state.lengths,
                                 state.done, prompt_tokens, prompt_mask, n=n)
  # Decode steps run: the first token comes from the prefill, the loop ran until the longest row.
  steps = jnp.max(state.lengths) - 1
  busy = jnp.sum(state.lengths) - state.lengths.shape[0]
  stats = {"slot_steps": steps * state.lengths.shape[0], "busy_slot_steps": busy,
           "decode_steps": steps,
           "slot_utilization": busy / jnp.maximum(steps * state.lengths.shape[0], 1)}
  return rollout, stats
