"""Choosing k tokens of a batch: exact counts, a total order, and per-token random draws.

The exploration suite's methods pick a share of a batch's tokens (Clip-Cov's random draw among
its candidates, KL-Cov's top covariances, the top-entropy mask). Three things make such a pick the
same however the batch is split, and these helpers provide them:

  * the count k = int(fraction * n) or ceil(fraction * n) is exact integer arithmetic: in float32
    a product such as 0.2 * 15 may land just above 3 (ceil 4), and float32 has no integers past
    2^24 anyway; `fraction_count` takes the fraction in millionths and never rounds;
  * ties are broken by (row, position), so "the k largest" is one set, not whichever the sort
    kernel happened to put first (`first_k`);
  * a token's random draw depends on (rng, row, position) only, where the row is the rollout's own
    row index, not its place in a micro-batch (`token_bits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
SCALE = 1_000_000  # fractions are exact to a millionth


def check_fraction(fraction: float, name: str) -> None:
  """A clear error for a fraction outside (0, 1] or finer than a millionth."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"{name}={fraction}: need a share of tokens in (0, 1]")
  if abs(round(fraction * SCALE) - fraction * SCALE) > 1e-6 * SCALE * fraction:
    raise ValueError(f"{name}={fraction}: give the share to a millionth (e.g. 2e-4, 0.002)")


def fraction_count(n: Array, fraction: float, *, round_up: bool) -> Array:
  """ceil(fraction * n) (round_up) or floor(fraction * n), exactly, for an int32 count n >= 0.

  fraction = p / 10^6 with p an integer; n is split into base-1000 digits so that no product
  leaves int32: p * n / 10^6 = p * hi + (p * mid) / 10^3 + p * lo / 10^6 (n = hi 10^6 +
  mid 10^3 + lo)."""
  p = int(round(fraction * SCALE))
  n = jnp.asarray(n, jnp.int32)
  hi, mid, lo = n // SCALE, (n // 1000) % 1000, n % 1000
  pm = p * mid  # < 10^9
  whole = p * hi + pm // 1000
  rest = (pm % 1000) * 1000 + p * lo  # the remainder over 10^6, < 10^9 + 10^6
  floor = whole + rest // SCALE
  return floor + (rest % SCALE > 0) if round_up else floor


def first_k(keys: tuple[Array, ...], k: Array, rows: Array | None = None) -> Array:
  """bool [B, T]: the k entries of [B, T] that come first in the order of `keys` (each [B, T];
  the first is the most significant), ties broken by row (`rows` [B], the rows' ids; default
  0..B-1), then position."""
  b, t = keys[0].shape
  rows = jnp.arange(b) if rows is None else rows
  rows = jnp.broadcast_to(rows.astype(jnp.int32)[:, None], (b, t))
  cols = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
  # lexsort sorts by its last key first.
  order = jnp.lexsort(tuple(x.reshape(-1) for x in (cols, rows, *reversed(keys))))
  chosen = jnp.zeros((b * t,), bool).at[order].set(jnp.arange(b * t) < k)
  return chosen.reshape(b, t)


def token_bits(rng: Array, rows: Array, t: int) -> Array:
  """uint32 [B, T] random bits; entry (i, j) depends only on (rng, rows[i], j)."""
  def one_row(row):
    key = jax.random.fold_in(rng, row)
    return jax.vmap(lambda j: jax.random.bits(jax.random.fold_in(key, j), (), jnp.uint32))(
        jnp.arange(t))
  return jax.vmap(one_row)(rows.astype(jnp.int32))
