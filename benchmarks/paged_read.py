"""One decode step's attention read on this machine: the paged engine's CPU reads (its native
kernel, its pure-JAX gather) against a contiguous read of the same rows.

  .venv/bin/python benchmarks/paged_read.py
  .venv/bin/python benchmarks/paged_read.py --settings fixed --repeats 9

What the paged engine's CPU speed rests on. A decode step attends each row's query over its keys;
the continuous and static engines keep a row's keys contiguous ([S, K, view, H], read by
`attention.dense`, batched matmuls), the paged engine keeps them in pages of a pool ([K, NP, PS,
H]) and on CPU reads them with its native kernel (`cpu_paged_attention`: each row's pages walked
in place) or with `paged_attention`'s gather: the rows' pages as a flat list of (row, page)
entries, a partial softmax per entry, combined per row. This script times the reads of the same
keys and values, one layer, inside a `lax.fori_loop` (as inside the engines' decode
loops, so no dispatch per call is counted), and prints the positions each reads, microseconds per
call, nanoseconds per position read and per position filled, and the ratios. The two outputs are
compared (max |difference|). The native kernel reads exactly the filled positions. On CPU the
gather is compiled as the engine compiles its decode
program (`paged.CPU_COMPILER_OPTIONS`: YNNPACK for the dots only) and, beside it, with XLA's
default options (reductions in YNNPACK too); the contiguous read with the defaults, as the
other engines are.

Settings (rows in flight and lengths as the rollout benchmark's engines see them,
`benchmarks/rollout_engine.py`; 2 kv heads of 2 query heads each, pages of 16 positions):

  tiny      head dim 16, 64 rows, geometric lengths (mean ~70, cap 392): its bulk phase
  tiny-tail head dim 16, 8 rows of the same lengths: its drain
  fixed     head dim 32, 40 rows, lengths uniform in 32 .. 160: the fixed setting's rows in flight
  long      head dim 32, 128 rows, 32 + geometric (mean ~64, cap 544)

The contiguous read covers a view of the longest row (rounded up to 16), as the continuous
engine's view does; the gather reads the smallest of its compiled sizes that holds the rows'
pages (`paged_attention.entry_levels`), as the engine does.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from explore_jax.models import attention, cpu_paged_attention, paged_attention
from explore_jax.rollout import paged

KV_HEADS, GROUP, PAGE = 2, 2, 16
SETTINGS = {  # head dim, rows, lengths(rng, rows)
    "tiny": (16, 64, lambda r, s: np.minimum(8 + r.geometric(1 / 62, s), 392)),
    "tiny-tail": (16, 8, lambda r, s: np.minimum(8 + r.geometric(1 / 62, s), 392)),
    "fixed": (32, 40, lambda r, s: r.integers(32, 161, s)),
    "long": (32, 128, lambda r, s: np.minimum(32 + r.geometric(1 / 64, s), 544)),
}


def _in_loop(fn, iters: int, options=None):
  """fn(q, *args) called `iters` times in a fori_loop, each call's q depending on the last
  call's output (so nothing is hoisted out of the loop); -> a jitted function of (q, *args),
  compiled with XLA options `options` (None: the defaults)."""

  def run(q, *args):
    def body(_, carry):
      q, acc = carry
      out = fn(q * (1 + acc * 1e-30), *args)
      return q, acc + out.ravel()[0] * 1e-9
    return jax.lax.fori_loop(0, iters, body, (q, jnp.float32(0)))[1]

  return jax.jit(run, compiler_options=options)


def _seconds(fn, args) -> float:
  start = time.perf_counter()
  fn(*args).block_until_ready()
  return time.perf_counter() - start


def run(name: str, iters: int, repeats: int, seed: int):
  h, s, draw = SETTINGS[name]
  r = np.random.default_rng(seed)
  lengths = draw(r, s).astype(np.int32)
  view = int(-(-lengths.max() // PAGE) * PAGE)
  width = view // PAGE
  need = int(np.sum(-(-lengths // PAGE)))
  pool_pages = 4 * need  # room to spare, as a pool has: the gather's sizes go past the need
  # Each row's pages: distinct pages of the pool, in a random order (as a pool's free list gives
  # them after a while); the contiguous cache holds the same keys and values.
  order = r.permutation(pool_pages)
  table = np.full((s, width), 0, np.int32)
  kp = r.normal(size=(KV_HEADS, pool_pages, PAGE, h)).astype(np.float32)
  vp = r.normal(size=(KV_HEADS, pool_pages, PAGE, h)).astype(np.float32)
  k = np.zeros((s, KV_HEADS, view, h), np.float32)
  v = np.zeros((s, KV_HEADS, view, h), np.float32)
  used = 0
  for i, length in enumerate(lengths):
    count = -(-length // PAGE)
    table[i, :count] = order[used:used + count]
    used += count
    rows = kp[:, table[i, :count]].reshape(KV_HEADS, count * PAGE, h)
    k[i, :, :count * PAGE] = rows
    v[i, :, :count * PAGE] = vp[:, table[i, :count]].reshape(KV_HEADS, count * PAGE, h)
  q = r.normal(size=(s, KV_HEADS * GROUP, h)).astype(np.float32)
  mask = (np.arange(view)[None] < lengths[:, None]).astype(np.int32)
  read = paged_attention.PagedRead("gather", entries=pool_pages)

  def contiguous(q, k, v, mask, last):
    return attention.dense(q[:, None], k, v, mask, last[:, None])[:, 0]

  def gather(q, kp, vp, table, reads):
    return paged_attention.attend(q, kp, vp, table, reads, read)

  def native(q, kp, vp, table, reads):
    return cpu_paged_attention.attend(q, kp, vp, table, reads)

  args_c = tuple(map(jnp.asarray, (q, k, v, mask, lengths - 1)))
  args_g = tuple(map(jnp.asarray, (q, kp, vp, table, lengths)))
  ref = jax.jit(contiguous)(*args_c)
  diff = float(jnp.max(jnp.abs(ref - jax.jit(gather)(*args_g))))
  native_diff = float(jnp.max(jnp.abs(ref - jax.jit(native)(*args_g))))
  if not max(diff, native_diff) < 1e-4:  # reads of the same keys: timing means nothing otherwise
    raise AssertionError(f"{name}: the gather and the native kernel differ from the contiguous "
                         f"read by {diff} and {native_diff}")
  cpu = jax.default_backend() == "cpu"
  fns = {"contiguous": (_in_loop(contiguous, iters), args_c),
         "native": (_in_loop(native, iters), args_g),
         "gather": (_in_loop(gather, iters, paged.CPU_COMPILER_OPTIONS if cpu else None),
                    args_g)}
  if cpu:  # the gather as XLA compiles it by default (its reductions in YNNPACK)
    fns["gather, XLA defaults"] = (_in_loop(gather, iters), args_g)
  for fn, args in fns.values():  # compile
    _seconds(fn, args)
  times = {key: [] for key in fns}
  for _ in range(repeats):  # interleaved rounds: a slow spell falls on both
    for key, (fn, args) in fns.items():
      times[key].append(_seconds(fn, args) / iters)
  times = {key: np.asarray(t) for key, t in times.items()}
  filled = int(lengths.sum())
  # The gather's read as the engine counts it: the smallest of its compiled sizes that holds the
  # rows' pages.
  read_pos = {"contiguous": s * view,
              "gather": int(paged_attention.gather_read(jnp.asarray(lengths), PAGE, pool_pages))}
  read_pos["gather, XLA defaults"] = read_pos["gather"]
  read_pos["native"] = filled
  print(f"\n{name}: {s} rows, head dim {h}, lengths mean {lengths.mean():.0f} max "
        f"{lengths.max()}, {filled} positions filled; max |contiguous - gather| {diff:.1e}, "
        f"|contiguous - native| {native_diff:.1e}")
  print(f"{'read':<22}{'positions':>10}{'/ filled':>10}{'us/call':>10}{'ns/read':>9}"
        f"{'ns/filled':>11}")
  for key in fns:
    us = float(np.median(times[key])) * 1e6
    print(f"{key:<22}{read_pos[key]:>10}{read_pos[key] / filled:>10.2f}{us:>10.1f}"
          f"{us * 1e3 / read_pos[key]:>9.1f}{us * 1e3 / filled:>11.1f}")
  own = times["native"] / times["contiguous"]
  print(f"native / contiguous: {np.median(own):.2f}x per call ({own.min():.2f}-"
        f"{own.max():.2f})")
  ratio = times["gather"] / times["contiguous"]
  per_pos = ratio * read_pos["contiguous"] / read_pos["gather"]
  print(f"gather / contiguous: {np.median(ratio):.2f}x per call ({ratio.min():.2f}-"
        f"{ratio.max():.2f}), {np.median(per_pos):.2f}x per position read")
  if "gather, XLA defaults" in times:
    gain = times["gather, XLA defaults"] / times["gather"]
    print(f"gather with XLA's default options / as the engine compiles it: "
          f"{np.median(gain):.2f}x ({gain.min():.2f}-{gain.max():.2f})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--iters", type=int, default=200, help="calls per timed loop")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}); one layer's decode read, "
        f"{args.iters} calls per loop, median of {args.repeats} interleaved rounds")
  for name in args.settings.split(","):
    run(name, args.iters, args.repeats, args.seed)


if __name__ == "__main__":
  main()
