"""Paired comparisons of RL arms on held-out problems: how sure is a difference in pass@k?

Every arm is trained from the same base with the same seeds and data order, and every model is
evaluated on the same problems, so arm and baseline are paired twice: by seed and by problem. For
an arm against the baseline and one metric (pass@k, estimated per problem without bias from n
samples), with d[s, i] = arm[s, i] - baseline[s, i] on seed s and problem i:

  t-interval   the seeds' mean differences mean_i d[s, i] are S paired draws; a t-interval on
               their mean (S - 1 degrees of freedom). It carries the seed-to-seed spread (RL is
               noisy), and with 5 seeds it is wide.
  bootstrap    problems resampled with replacement within each seed, the mean over seeds of the
               resampled means; percentile interval. It carries only the choice of problems, not
               the seeds' spread, so it is narrower; both are reported, neither alone is the answer.
  coverage     problems solved (at least one correct of n samples) by the arm and not the baseline,
               and the reverse, per seed: the "solves new problems" question of pass@k at k = n.

The floor against which any pass@k reads: a bare number scores nothing (the reward evaluates an
expression), and a uniformly random legal attempt solves problem i with probability q_i
(`data.countdown.solve_rate`), so its pass@k is mean_i 1 - (1 - q_i)^k.
"""

from __future__ import annotations

import csv
from typing import Mapping, Sequence

import numpy as np
from scipy import stats


def read_per_problem(path: str, benchmark: str) -> dict[str, dict[str, dict[str, float]]]:
  """{model: {problem_id: {column: value}}} of evaluate's per_problem.csv for one benchmark."""
  out: dict[str, dict[str, dict[str, float]]] = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      if row["benchmark"] != benchmark:
        continue
      out.setdefault(row["model"], {})[row["problem_id"]] = {
          k: float(v) for k, v in row.items() if k not in ("model", "benchmark", "problem_id")}
  if not out:
    raise ValueError(f"{path}: no rows of benchmark {benchmark!r}")
  return out


def matrix(per_problem: Mapping[str, Mapping[str, Mapping[str, float]]], models: Sequence[str],
           column: str, problems: Sequence[str]) -> np.ndarray:
  """[len(models), len(problems)] of one column; every model must have every problem."""
  rows = []
  for m in models:
    missing = [p for p in problems if p not in per_problem[m]]
    if missing:
      raise ValueError(f"model {m} has no {column} for {len(missing)} problems, e.g. {missing[0]}")
    rows.append([per_problem[m][p][column] for p in problems])
  return np.asarray(rows, np.float64)


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
  """Two-sided t-interval of the mean of `values`; None for fewer than 2 values."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return None
  half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
  return float(v.mean() - half), float(v.mean() + half)


def bootstrap_interval(diff: np.ndarray, draws: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
  """Percentile interval of mean_s mean_i diff[s, i] with problems resampled within each seed."""
  diff = np.asarray(diff, np.float64)
  seeds, problems = diff.shape
  rng = np.random.default_rng(seed)
  stat = np.empty(draws)
  for b in range(draws):
    idx = rng.integers(0, problems, size=(seeds, problems))
    stat[b] = np.take_along_axis(diff, idx, axis=1).mean()
  lo, hi = np.quantile(stat, [0.5 - level / 2, 0.5 + level / 2])
  return float(lo), float(hi)


def paired(arm: np.ndarray, baseline: np.ndarray, draws: int = 2000) -> dict:
  """Arm vs baseline on [seeds, problems] matrices of one metric."""
  if arm.shape != baseline.shape:
    raise ValueError(f"paired: arm {arm.shape} and baseline {baseline.shape} differ in shape")
  diff = arm - baseline
  per_seed = diff.mean(axis=1)
  return {"diff": float(per_seed.mean()), "per_seed": per_seed.tolist(),
          "t_interval": t_interval(per_seed), "bootstrap": bootstrap_interval(diff, draws)}


def coverage(arm_correct: np.ndarray, baseline_correct: np.ndarray) -> dict:
  """Per seed, problems solved by one side's samples (num_correct > 0) and not the other's."""
  a, b = arm_correct > 0, baseline_correct > 0
  return {"arm_only": (a & ~b).sum(axis=1).tolist(), "baseline_only": (b & ~a).sum(axis=1).tolist(),
          "both": (a & b).sum(axis=1).tolist(), "neither": (~a & ~b).sum(axis=1).tolist()}


def guess_floor(solve_rates: Sequence[float], ks: Sequence[int]) -> dict[int, float]:
  """pass@k of uniformly random legal attempts, from each problem's exact solve rate."""
  q = np.asarray(solve_rates, np.float64)
  return {int(k): float(np.mean(1.0 - (1.0 - q) ** k)) for k in ks}


def compare_arms(per_problem, runs: Mapping[str, Sequence[str]], baseline: str,
                 columns: Sequence[str], draws: int = 2000) -> dict:
  """{arm: {column: paired(...)}, arm + ".coverage": ...} for every arm of `runs` against
  `baseline`; runs[arm] lists the arm's model labels, seed by seed, in the same seed order."""
  problems = sorted(set.intersection(*(set(per_problem[m]) for ms in runs.values() for m in ms)))
  base = runs[baseline]
  out = {}
  for arm, models in runs.items():
    if arm == baseline:
      continue
    if len(models) != len(base):
      raise ValueError(f"arm {arm} has {len(models)} seeds, the baseline {len(base)}")
    row = {c: paired(matrix(per_problem, models, c, problems),
                     matrix(per_problem, base, c, problems), draws) for c in columns}
    row["coverage"] = coverage(matrix(per_problem, models, "num_correct", problems),
                               matrix(per_problem, base, "num_correct", problems))
    out[arm] = row
  return {"problems": len(problems), "seeds": len(base), "arms": out}
