"""Graded responses per second: RewardPool vs a single in-process math-verify loop.

    .venv/bin/python benchmarks/rewards.py [--n 600] [--workers 2]

Responses are MATH-500 reference solutions with their answer boxed at the end, half of them with
a wrong final answer, so every response is long real text. Three columns on like sets of responses
(each column warmed up on a set of its own first, then timed on a fresh set):
  naive loop   math_verify.verify(parse(gold), parse(response)) per response, in this process
  grade loop   rewards.grade per response, in this process (same extraction and fast paths as the
               pool, no worker processes): the pool's speedup over this is pure parallelism
  pool         RewardPool(max_workers).score (workers started before timing)
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math_verify  # pylint: disable=g-import-not-at-top
import numpy as np

from explore_jax import data, rewards


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, default=600)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args()
  recs = list(data.load("math500", "test"))

  def make(k):
    # Set k: wrong answers carry a distinct term per set, so no column reuses another's parse
    # caches; every column first grades a warm-up set of its own (same golds).
    responses, golds = [], []
    for i in range(args.n):
      r = recs[i % len(recs)]
      answer = r["answer"] if i % 2 == 0 else f"{r['answer']}+{i + 100000 * k}"
      responses.append(f"{r['solution']}\nThe final answer is $\\boxed{{{answer}}}$.")
      golds.append(r["answer"])
    return responses, golds

  def naive_loop(responses, golds):
    return np.array([math_verify.verify(math_verify.parse(f"${g}$"), math_verify.parse(resp))
                     for resp, g in zip(responses, golds)])

  def grade_loop(responses, golds):
    return np.array([rewards.grade(resp, g) for resp, g in zip(responses, golds)])

  naive_loop(*make(1))
  t = time.perf_counter()
  naive = naive_loop(*make(2))
  naive_s = time.perf_counter() - t

  grade_loop(*make(3))
  t = time.perf_counter()
  loop = grade_loop(*make(4))
  loop_s = time.perf_counter() - t

  with rewards.RewardPool(max_workers=args.workers, timeout_s=5.0) as pool:
    pool.check(*make(5))  # starts the workers and warms their caches
    t = time.perf_counter()
    pooled = pool.check(*make(6))
    pool_s = time.perf_counter() - t

  n = args.n
  print(f"{n} responses, {args.workers} workers, {len(os.sched_getaffinity(0))} cores")
  print(f"{'':14s}{'naive loop':>12s}{'grade loop':>12s}{'pool':>12s}")
  print(f"{'responses/s':14s}{n / naive_s:12.1f}{n / loop_s:12.1f}{n / pool_s:12.1f}")
  print(f"{'accuracy':14s}{naive.mean():12.3f}{loop.mean():12.3f}{pooled.mean():12.3f}")
  print(f"pool / naive loop = {naive_s / pool_s:.2f}x, pool / grade loop = {loop_s / pool_s:.2f}x")
  print(f"killed workers: {pool.killed}")


if __name__ == "__main__":
  main()
