"""The countdown task (explore_jax.data.countdown): exact solve rates, traces whose lines and
boxed expressions are right, and a checker that evaluates expressions and rejects the rest."""

import itertools
import random

import numpy as np
import pytest

from explore_jax import rewards
from explore_jax.data import countdown as cd


def _brute_force_rate(numbers, target, ops="+-*", draws=None):
  """Enumerate every attempt (move sequences with equal probability per choice)."""
  def rec(pool):
    if len(pool) == 1:
      return [(pool[0], 1.0)]
    out = []
    pairs = [(i, j) for i, j in itertools.permutations(range(len(pool)), 2)]
    for (i, j), op in itertools.product(pairs, ops):
      a, b = pool[i], pool[j]
      c = a + b if op == "+" else a - b if op == "-" else a * b
      rest = [x for k, x in enumerate(pool) if k not in (i, j)] + [c]
      out += [(v, p / (len(pairs) * len(ops))) for v, p in rec(rest)]
    return out
  return sum(p for v, p in rec(list(numbers)) if v == target)


def test_solve_rate_is_exact():
  # 3 numbers: 6 ordered pairs x 3 ops, then 2 x 3: 108 equally likely attempts.
  assert cd.solve_rate([1, 2, 3], 6) == pytest.approx(_brute_force_rate([1, 2, 3], 6))
  assert cd.solve_rate([2, 3, 4], 24) == pytest.approx(_brute_force_rate([2, 3, 4], 24))
  # By hand: 24 only by multiplying twice, any of 6 ordered first pairs x 2 orders of the rest.
  assert cd.solve_rate([2, 3, 4], 24) == pytest.approx(12 / 108)
  assert cd.solve_rate([4, 2, 3], 24) == cd.solve_rate([2, 3, 4], 24)  # order-free
  assert cd.solve_rate([1, 1, 1], 99) == 0.0


def test_problems_are_in_range_unique_and_split_by_hash():
  cfg = cd.CountdownConfig(train_size=300, test_size=60)
  train, test = cd.generate("train", config=cfg), cd.generate("test", config=cfg)
  assert len(train) == 300 and len(test) == 60
  assert not {r["problem"] for r in train} & {r["problem"] for r in test}
  assert len({r["problem"] for r in train}) == 300
  for r in train + test:
    rate = cd.solve_rate(r["numbers"], r["target"])
    assert cfg.min_solve_rate <= rate <= cfg.max_solve_rate and rate == r["solve_rate"]
    assert 1 <= r["target"] <= cfg.max_target
  assert cd.generate("train", 20, cfg) == train[:20]  # deterministic by seed


def test_traces_compute_right_and_box_what_they_computed():
  cfg = cd.CountdownConfig(retry_frac=0.5, train_size=200)
  rng = random.Random(0)
  retried = solved = 0
  for r in cd.generate("train", config=cfg):
    text = cd.trace(r, cfg, rng)
    lines = text.split("\n")
    for line in lines:
      if " = " in line:
        lhs, rhs = line.split(" = ")
        a, op, b = lhs.split(" ")
        assert eval(f"({a}) {op} ({b})") == int(rhs), line  # every step is right
    boxed = rewards.last_boxed(text)
    last_value = int([l for l in lines if " = " in l][-1].split(" = ")[1])
    assert eval(boxed) == last_value  # the expression is the last attempt's
    ok = cd.is_solution(boxed, r["answer"])
    solved += ok
    if cd.retries(r["problem"], cfg.retry_frac):
      retried += 1
      # A retrying trace stops at the first attempt that reaches the target.
      assert ok or cd.count_retries(text) == cfg.max_attempts - 1
      assert ("check: " in text) and (ok == text.endswith(f"is {r['target']}\n{lines[-1]}"))
    else:
      assert "check" not in text
  assert 60 < retried < 140 and solved > 0


def test_retrying_raises_the_success_rate():
  cfg = cd.CountdownConfig(train_size=400)
  rng = random.Random(1)
  probs = cd.generate("train", config=cfg)
  once = np.mean([cd.is_solution(rewards.last_boxed(cd.trace(r, cfg.__class__(
      retry_frac=0.0), rng)), r["answer"]) for r in probs])
  always = np.mean([cd.is_solution(rewards.last_boxed(cd.trace(r, cfg.__class__(
      retry_frac=1.0), rng)), r["answer"]) for r in probs])
  rate = np.mean([r["solve_rate"] for r in probs])
  assert abs(once - rate) < 0.05  # one random attempt succeeds at the solve rate
  # up to 4 attempts: 1 - E[(1 - p)^4], well above one attempt's rate
  expected = np.mean([1 - (1 - r["solve_rate"]) ** cfg.max_attempts for r in probs])
  assert abs(always - expected) < 0.06 and always > once + 0.1


@pytest.mark.parametrize("expression,ok", [
    ("7 * 3 - (5 - 5)", True), ("(7 * 3) + 5 - 5", True), ("7 \\times 3 + 5 - 5", True),
    ("21", False),                      # the target without the numbers
    ("7 * 3", False),                   # numbers left unused
    ("7 * 3 + 5 - 5 + 0", False),       # a number not given
    ("7 * 3 * 5 / 5", False),           # division is not an allowed operation
    ("7 * 3 + -5 + 5", False),          # a negated number is not a given one
    ("7 ** 3 - 5 - 5", False), ("__import__('os')", False), ("7 * 3 + 5 - 5.0", False),
    ("(" * 150 + "7" + ")" * 150, False),  # too long to parse
    (None, False)])
def test_checker_evaluates_and_rejects(expression, ok):
  assert cd.is_solution(expression, "21|3,5,5,7") is ok


def test_countdown_reward_method():
  responses = ["7 * 3 = 21\n\\boxed{7 * 3 + 5 - 5}", "\\boxed{21}", "no answer",
               "\\boxed{9 ** 9 ** 9 ** 9}"]
  scores = rewards.score(responses, ["21|3,5,5,7"] * 4, method="countdown", max_workers=1)
  np.testing.assert_array_equal(scores, [1.0, -1.0, -1.0, -1.0])
