"""pass@k of a tiny model on the held-out split of the synthetic arithmetic task, on a CPU.

    python -m explore_jax.evaluate --config configs/eval_tiny.py \
        --config.models="('/tmp/tiny_base/final', '/tmp/tiny_cpu/final')" --workdir /tmp/eval_tiny

Same code path and sampling protocol as configs/eval_paper.py (temperature 0.6, top-p 0.95), with
short responses and n = 16 samples of 64 problems.
"""

from explore_jax.evaluation import evaluate


def get_config(arg: str | None = None):
  del arg
  c = evaluate.base_config()
  c.dtype = "float32"
  c.batch_size = 128
  c.prompt_bucket = 64
  c.reward_workers = 2
  c.sampling.temperature = 0.6
  c.sampling.top_p = 0.95
  c.sampling.max_new_tokens = 64
  c.benchmarks.synthetic = evaluate.benchmark(
      "synthetic_arithmetic", 16, split="test", template="synthetic", max_problems=64)
  return c
