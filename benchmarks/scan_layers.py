"""model.scan_layers: compile time of a training step and decode speed, scanned vs per-layer.

  python benchmarks/scan_layers.py [--layers 28 --width 128 --seq 256 --batch 4]
                                   [--decode_batch 16 --prompt 64 --new 128]

Compile: the gradient of a token-level loss of `qwen2.forward` (remat "full", as the 7B configs
run) over `--batch` x `--seq`, lowered and compiled from shapes, per-layer params vs the same
config with scan_layers. Decode: `rollout_lib.generate` (greedy, no EOS) over the same weights in
both layouts, median of 3 timed calls after a warm-up; the scanned model decodes unrolled over
slices of its stacked parameters (`qwen2.apply_with_cache`). CPU timings on a shared machine
are noisy; compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from explore_jax import rollout as rollout_lib
from explore_jax.models import qwen2


def _compile_seconds(cfg, batch, seq):
  params = qwen2.param_shapes(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def loss(p, t):
    logits = qwen2.forward(p, t, cfg)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  start = time.perf_counter()
  jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return time.perf_counter() - start


def _decode_seconds(cfg, params, prompts, mask, new):
  run = lambda: jax.block_until_ready(rollout_lib.generate(
      cfg, params, prompts, mask, jax.random.key(0), max_new_tokens=new, temperature=0.0,
      eos_id=-1).tokens)
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  times = []
  for _ in range(3):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=28)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--decode_batch", type=int, default=16)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  a = ap.parse_args()
  cfg = qwen2.Qwen2Config(vocab_size=512, hidden_size=a.width, intermediate_size=3 * a.width,
                          num_hidden_layers=a.layers, num_attention_heads=4,
                          num_key_value_heads=2, remat=True, eos_token_id=None)
  scan = cfg.replace(scan_layers=True)
  print(f"{a.layers} layers, width {a.width}, jax {jax.__version__} on {jax.default_backend()}")
  flat_s, scan_s = _compile_seconds(cfg, a.batch, a.seq), _compile_seconds(scan, a.batch, a.seq)
  print(f"train-step compile (grad, {a.batch}x{a.seq}, remat full): per-layer {flat_s:.1f} s, "
        f"scanned {scan_s:.1f} s, ratio {scan_s / flat_s:.2f}x")
  params = qwen2.init_params(cfg, jax.random.key(0))
  stacked = qwen2.stack_layers(params)
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(0, 512, (a.decode_batch, a.prompt)), jnp.int32)
  mask = jnp.ones_like(prompts)
  (f1, d1), (f2, d2) = (_decode_seconds(cfg, params, prompts, mask, a.new),
                        _decode_seconds(scan, stacked, prompts, mask, a.new))
  tok = a.decode_batch * a.new
  print(f"decode ({a.decode_batch} rows x {a.new} tokens): per-layer {tok / d1:.0f} tok/s "
        f"(first call {f1:.1f} s), scanned params {tok / d2:.0f} tok/s (first call {f2:.1f} s), "
        f"ratio {d1 / d2:.2f}x")


if __name__ == "__main__":
  main()
