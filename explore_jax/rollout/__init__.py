"""Rollouts: n responses per prompt with their log-probs and entropies, from one of three engines.

  sampling  the static sampler (all rows decode until the longest ends) and what the engines
            share: token selection, per-row random keys, the `Rollout` they return
  engine    the continuous-batching engine: decode slots refilled as their rows end, each with a
            contiguous cache of P + N positions
  paged     the paged engine: a pool of KV pages handed to rows as they grow, slots refilled on
            the device
  cli       `python -m explore_jax.generate`

`generate` below is the one entry point: it checks the arguments and dispatches on `engine`. All
engines return the same Rollout for the same rng: a row's draws depend only on (rng, prompt index,
sample index, position).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from explore_jax.models.qwen2 import Params, Qwen2Config
from explore_jax.rollout import engine as engine_lib
from explore_jax.rollout import paged as paged_lib
from explore_jax.rollout import sampling
from explore_jax.rollout.sampling import NO_EOS, SEGMENTS, Rollout, Sampler

ENGINES = ("static", "continuous", "paged")


def generate(config: Qwen2Config, params: Params, prompt_tokens: jax.Array,
             prompt_mask: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_id: int, n: int = 1,
             mesh: Mesh | None = None, segments: int = SEGMENTS,
             prompt_index: jax.Array | None = None, sample_offset: int = 0,
             engine: str = "static", slots: int = 0, chunk: int = 16, kv_block: int | None = None,
             refill_share: float | None = None, kv_pages: int = 0,
             page_size: int = paged_lib.PAGE_SIZE, page_block: int = paged_lib.PAGE_BLOCK,
             page_attention: str = "auto", with_stats: bool = False
             ) -> Rollout | tuple[Rollout, dict]:
  """Sample n responses per left-padded prompt [B, P]; rows i*n .. i*n+n-1 answer prompt i.

  Every row gets exactly max_new_tokens columns; eos_id=NO_EOS never stops (fixed lengths).
  temperature 0 is greedy; top_k 0 / top_p 1 switch truncation off. Each distinct
  (temperature, top_k, top_p, max_new_tokens, n, shapes) compiles once. With a mesh, the rows are
  split over the data axes and the kv heads over `tensor` (params and prompts may already be
  sharded on it). `segments`: the decode loop runs in that many pieces over a growing view of the
  cache, so that early steps do not attend over its empty tail (same results; each piece is
  compiled, so compile time grows with it).

  Randomness: row i*n+j draws with the keys of (rng, prompt_index[i], sample_offset + j)
  (`sampling.row_keys`); prompt_index [B] defaults to 0..B-1 (give the prompts' indices in the
  whole step when a step is sampled in several calls).
  engine="static" samples all rows at once (`sampling.generate_static`); "continuous" keeps
  `slots` decode slots busy and refills each finished one at once (`engine.run`; a device call's
  cache read is sized for `chunk` decode steps ahead and the call runs on while its rows fit it,
  until a `refill_share` of the slots is free (past `chunk` steps, any slot); its decode attention
  reads each row's filled blocks of `kv_block` slots, 0: `segments` cache-view buckets). "paged"
  decodes up to `slots` rows at once over a pool of `kv_pages` pages of `page_size` positions
  (0: enough for every slot's full row), refilling slots on the device and preempting the
  youngest rows when the pool runs dry (`paged.run`; `page_attention`: "auto" (the Pallas kernel
  on TPU, the native kernel on CPU where it builds, a pure-JAX gather elsewhere), "gather",
  "native_cpu", "pallas_tpu" or "pallas_gpu", the Pallas kernels reading `page_block` pages per
  block). All return the same Rollout. with_stats: (Rollout, stats) with
  stats["slot_utilization"] = generated tokens / decode slot-steps (the static sampler's slots
  are its rows); the paged engine's also carry its peak pages, preemptions, host round trips and
  kv_read_over_filled (the kernels' read over the positions attended).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  if n < 1:
    raise ValueError(f"n={n}: must be >= 1")
  if not (0 <= eos_id < config.vocab_size or eos_id == NO_EOS):
    raise ValueError(f"eos_id={eos_id} is outside the vocabulary (size {config.vocab_size}); "
                     f"use {NO_EOS} for fixed-length rollouts")
  if engine not in ENGINES:
    raise ValueError(f"engine={engine!r}: use one of {', '.join(map(repr, ENGINES))}")
  sampling.check_prompts(prompt_tokens, prompt_mask)
  sampler = Sampler(float(temperature), int(top_k), float(top_p))
  if prompt_index is None:
    prompt_index = np.arange(prompt_tokens.shape[0], dtype=np.int32)
  prompt_index = np.asarray(prompt_index, np.int32)  # the same on every process
  common = dict(max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, n=n, mesh=mesh,
                prompt_index=prompt_index, sample_offset=sample_offset)
  if engine == "paged":
    rollout, stats = paged_lib.run(
        config, params, prompt_tokens, prompt_mask, rng, slots=slots, kv_pages=kv_pages,
        page_size=page_size, page_block=page_block, attention=page_attention, **common)
  elif engine == "continuous":
    rollout, stats = engine_lib.run(
        config, params, prompt_tokens, prompt_mask, rng, slots=slots, chunk=chunk,
        buckets=segments, **common,
        kv_block=engine_lib.KV_BLOCK if kv_block is None else kv_block,
        refill_share=engine_lib.REFILL_SHARE if refill_share is None else refill_share)
  else:
    rollout, stats = sampling.generate_static(config, params, prompt_tokens, prompt_mask, rng,
                                              segments=segments, **common)
  return (rollout, stats) if with_stats else rollout
