"""One decoder layer's forward + backward with dense vs blockwise attention: memory and time.

  python benchmarks/attention.py [--lengths 1024,2048,4096,8192,16384] [--time_lengths 1024,4096]
                                 [--width 256 --heads 4 --kv_heads 2 --mlp 768 --batch 1 --iters 5]

For each length T it compiles the gradient (with respect to the layer's parameters and its input)
of a scalar loss of `qwen2.DecoderLayer` on CPU and prints XLA's own count of the compiled
program's temporary bytes (`compiled.memory_analysis().temp_size_in_bytes`) for both
implementations and their ratio; at the `--time_lengths` it also runs both and prints the median
wall time of `--iters` calls (after a warm-up) and the blockwise / dense time ratio. Compiling
needs no memory for the arrays, so the long lengths only cost compile time. Defaults: a small
width (256, 4 query heads over 2 kv heads of 64, MLP 768), one row, float32, a left-padded row
(the first eighth of the slots padding). CPU timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from explore_jax.models import qwen2


def _layer_grad(cfg: qwen2.Qwen2Config):
  layer = qwen2.DecoderLayer(cfg, 0)

  def loss(params, x, w, mask):
    t = x.shape[1]
    out, _ = layer.apply({"params": params}, x, qwen2.positions_from_mask(mask), mask > 0,
                         jnp.arange(t), None)
    return jnp.sum(out * w)

  return layer, jax.jit(jax.grad(loss, argnums=(0, 1)))


def _median_seconds(fn, iters: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  ap.add_argument("--time_lengths", default="1024,4096")
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv_heads", type=int, default=2)
  ap.add_argument("--mlp", type=int, default=768)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--iters", type=int, default=5)
  a = ap.parse_args()
  lengths = [int(x) for x in a.lengths.split(",")]
  timed = {int(x) for x in a.time_lengths.split(",") if x}
  base = qwen2.Qwen2Config(vocab_size=128, hidden_size=a.width, intermediate_size=a.mlp,
                           num_hidden_layers=1, num_attention_heads=a.heads,
                           num_key_value_heads=a.kv_heads)
  print(f"one decoder layer, forward + backward: width {a.width}, {a.heads} q heads over "
        f"{a.kv_heads} kv heads of {base.head_dim}, MLP {a.mlp}, batch {a.batch}, float32, "
        f"jax {jax.__version__} on {jax.default_backend()}")
  print(f"{'T':>6} {'dense MiB':>10} {'blockwise MiB':>14} {'mem ratio':>10} "
        f"{'dense ms':>9} {'blockwise ms':>13} {'time ratio':>11}")
  rng = np.random.default_rng(0)
  for t in lengths:
    x = jax.ShapeDtypeStruct((a.batch, t, a.width), jnp.float32)
    mask = jax.ShapeDtypeStruct((a.batch, t), jnp.int32)
    mem, ms = {}, {}
    for impl in ("dense", "blockwise"):
      layer, grad = _layer_grad(base.replace(attention=impl))
      params = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(x.shape),
                                                 jnp.zeros(mask.shape, jnp.int32),
                                                 jnp.ones(mask.shape, bool), jnp.arange(t),
                                                 None)["params"])
      compiled = grad.lower(params, x, x, mask).compile()
      mem[impl] = compiled.memory_analysis().temp_size_in_bytes / 2**20
      if t in timed:
        real = lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.02, s.dtype)
        p = jax.tree.map(real, params)
        xs, w = real(x), real(x)
        m = jnp.asarray(np.arange(t)[None].repeat(a.batch, 0) >= t // 8, jnp.int32)
        ms[impl] = 1e3 * _median_seconds(lambda: compiled(p, xs, w, m), a.iters)
    time_cols = (f"{ms['dense']:9.1f} {ms['blockwise']:13.1f} {ms['blockwise'] / ms['dense']:10.2f}x"
                 if ms else f"{'':9} {'':13} {'':11}")
    print(f"{t:>6} {mem['dense']:10.1f} {mem['blockwise']:14.1f} "
          f"{mem['blockwise'] / mem['dense']:9.3f}x {time_cols}", flush=True)


if __name__ == "__main__":
  main()
