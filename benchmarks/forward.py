"""Forward-pass throughput: explore_jax (jitted) vs transformers (torch CPU, no_grad), same weights.

  python benchmarks/forward.py [--batch 4] [--seq 128] [--iters 10] [--dtype float32]
                               [--torch_threads N]

Each row builds a random HF Qwen2 model, converts it with the checkpoint rename table, warms both
up, then reports the median of `--iters` timed full forwards as tokens/s and the JAX/torch ratio.
Both frameworks use all CPU threads. The max |logit difference| column checks that the two compute
the same function.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import make_tiny_hf  # noqa: E402  (the shared test helper builds the random model)

from explore_jax.models import qwen2  # noqa: E402

CONFIGS = {
    "tiny (D64 L2 V96)": dict(),
    "small (D512 L8 V32k)": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                 initializer_range=0.02),
}


def _median_seconds(fn, iters: int) -> float:
  fn()  # warm-up (compiles the JAX function)
  fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
  args = parser.parse_args()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  print(f"batch {args.batch} x seq {args.seq}, {args.dtype}, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} "
        "threads)")
  print(f"{'config':<22} {'jax tok/s':>12} {'torch tok/s':>12} {'jax/torch':>10} "
        f"{'max|dlogit|':>12}")
  for name, overrides in CONFIGS.items():
    t = make_tiny_hf(**overrides)
    cfg = t.config.replace(param_dtype=args.dtype, dtype=args.dtype)
    params = jax.tree.map(lambda x: x.astype(args.dtype), t.params)
    hf = t.hf.to(getattr(torch, args.dtype))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    jax_tokens, torch_tokens = jnp.asarray(tokens, jnp.int32), torch.as_tensor(tokens)
    forward = jax.jit(qwen2.forward, static_argnums=2)

    def run_jax():
      return forward(params, jax_tokens, cfg).block_until_ready()

    def run_torch():
      with torch.no_grad():
        return hf(torch_tokens).logits

    jax_s, torch_s = _median_seconds(run_jax, args.iters), _median_seconds(run_torch, args.iters)
    diff = np.abs(np.asarray(run_jax()) - run_torch().float().numpy()).max()
    n = args.batch * args.seq
    print(f"{name:<22} {n / jax_s:>12,.0f} {n / torch_s:>12,.0f} {torch_s / jax_s:>10.2f} "
          f"{diff:>12.2e}")


if __name__ == "__main__":
  main()
