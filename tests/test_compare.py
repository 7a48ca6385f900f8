"""Paired arm-vs-baseline statistics against scipy, closed forms and brute force."""

import random

import numpy as np
import pytest
from scipy import stats

from explore_jax.data import countdown
from explore_jax.evaluation import compare


def test_t_interval_is_scipy_s():
  v = np.array([0.02, -0.01, 0.05, 0.03, 0.00])
  got = compare.t_interval(v)
  want = stats.ttest_1samp(v, 0.0).confidence_interval(0.95)
  np.testing.assert_allclose(got, (want.low, want.high), rtol=1e-12)
  assert compare.t_interval(v[:1]) is None


def test_bootstrap_interval_resamples_problems_within_seeds():
  # A constant difference has a zero-width interval at that value.
  assert compare.bootstrap_interval(np.full((3, 50), 0.1)) == pytest.approx((0.1, 0.1))
  # Many problems: the interval is the normal one, mean +- 1.96 * sd / sqrt(seeds * problems).
  rng = np.random.default_rng(0)
  diff = rng.normal(0.05, 0.3, size=(5, 400))
  lo, hi = compare.bootstrap_interval(diff, draws=4000)
  half = 1.96 * diff.std() / np.sqrt(diff.size)
  assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
  assert (lo + hi) / 2 == pytest.approx(diff.mean(), abs=0.2 * half)
  # Seeds are not resampled: a seed offset that the t-interval sees does not widen it.
  shifted = diff + np.array([[-1.0], [-0.5], [0.0], [0.5], [1.0]])
  lo2, hi2 = compare.bootstrap_interval(shifted, draws=4000)
  assert (hi2 - lo2) == pytest.approx(hi - lo, rel=0.15)
  t_lo, t_hi = compare.t_interval(shifted.mean(axis=1))
  assert t_hi - t_lo > 5 * (hi2 - lo2)


def test_paired_and_coverage_by_hand():
  arm = np.array([[1.0, 0.5, 0.0], [0.5, 0.5, 1.0]])
  base = np.array([[0.5, 0.5, 0.5], [0.0, 1.0, 0.0]])
  out = compare.paired(arm, base, draws=200)
  np.testing.assert_allclose(out["per_seed"], [0.0, 1.0 / 3.0])
  assert out["diff"] == pytest.approx(1.0 / 6.0)
  lo, hi = out["t_interval"]
  assert lo < 1.0 / 6.0 < hi
  cov = compare.coverage(np.array([[2, 0, 1, 0]]), np.array([[0, 0, 3, 1]]))
  assert cov == {"arm_only": [1], "baseline_only": [1], "both": [1], "neither": [1]}
  with pytest.raises(ValueError, match="differ in shape"):
    compare.paired(arm, base[:1])


def test_compare_arms_pairs_models_by_seed_and_problem():
  per_problem = {}
  for m, vals in {"b0": [0.0, 1.0], "b1": [0.5, 0.5], "a0": [1.0, 1.0], "a1": [0.5, 0.0]}.items():
    per_problem[m] = {f"p{i}": {"pass@1": v, "num_correct": 8 * v} for i, v in enumerate(vals)}
  out = compare.compare_arms(per_problem, {"base": ["b0", "b1"], "arm": ["a0", "a1"]}, "base",
                             ["pass@1"], draws=100)
  assert out["problems"] == 2 and out["seeds"] == 2 and list(out["arms"]) == ["arm"]
  np.testing.assert_allclose(out["arms"]["arm"]["pass@1"]["per_seed"], [0.5, -0.25])
  assert out["arms"]["arm"]["coverage"]["arm_only"] == [1, 0]


def test_guess_floor_matches_simulated_random_attempts():
  config = countdown.CountdownConfig()
  problems = countdown.load_split("test", config)[:20]
  floor = compare.guess_floor([p["solve_rate"] for p in problems], [1, 4])
  rng = random.Random(0)
  draws = 400
  hits = np.array([[countdown.random_attempt(p["numbers"], config.ops, rng, config.max_value)[0]
                    == p["target"] for _ in range(draws)] for p in problems])
  sd = np.sqrt(floor[1] * (1 - floor[1]) / hits.size)
  assert abs(hits.mean() - floor[1]) < 4 * sd
  four = hits[:, :draws // 4 * 4].reshape(len(problems), -1, 4).any(axis=2).mean()
  assert abs(four - floor[4]) < 0.05
