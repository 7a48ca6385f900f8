"""The countdown task (explore_jax.data.countdown): exact solve rates, traces whose lines and
boxed expressions are right, and a checker that evaluates expressions and rejects the rest."""

import itertools
import random

import numpy as np
import pytest

from explore_jax import rewards
from explore_jax.data import countdown as cd


def _brute_force_rate(numbers, target, ops="+-*", max_value=99):
  """Enumerate every attempt (move sequences with equal probability per legal choice: results
  in [0, max_value])."""
  def rec(pool):
    if len(pool) == 1:
      return [(pool[0], 1.0)]
    out = []
    pairs = [(i, j) for i, j in itertools.permutations(range(len(pool)), 2)]
    legal = []
    for (i, j), op in itertools.product(pairs, ops):
      a, b = pool[i], pool[j]
      c = a + b if op == "+" else a - b if op == "-" else a * b
      if 0 <= c <= max_value:
        legal.append([x for k, x in enumerate(pool) if k not in (i, j)] + [c])
    for rest in legal:
      out += [(v, p / len(legal)) for v, p in rec(rest)]
    return out
  return sum(p for v, p in rec(list(numbers)) if v == target)


def test_solve_rate_is_exact():
  # 3 numbers: 6 ordered pairs x 3 ops, then 2 x 3, less the moves that leave [0, 99].
  assert cd.solve_rate([1, 2, 3], 6) == pytest.approx(_brute_force_rate([1, 2, 3], 6))
  assert cd.solve_rate([2, 3, 4], 24) == pytest.approx(_brute_force_rate([2, 3, 4], 24))
  assert cd.solve_rate([7, 8, 9], 63) == pytest.approx(_brute_force_rate([7, 8, 9], 63))
  # By hand: 24 only by multiplying twice. First moves: 6 ordered pairs x (+, *) and the 3
  # non-negative differences = 15; each of the 6 products leaves a pair with 5 legal moves (both
  # sums, both products, one difference), 2 of them a product: 6 / 15 x 2 / 5.
  assert cd.solve_rate([2, 3, 4], 24) == pytest.approx(12 / 75)
  # 9 * 9 = 81, then 81 * 9 leaves [0, 99]: never played, so 729 is out of reach.
  assert cd.solve_rate([9, 9, 9], 729, max_value=99) == 0.0
  assert cd.solve_rate([9, 9, 9], 729, max_value=1000) > 0.0
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


def test_values_stay_in_range_and_the_data_api_serves_the_task():
  from explore_jax import data
  from explore_jax.data import templates
  cfg = cd.CountdownConfig(train_size=200, test_size=40)
  rng = random.Random(2)
  for r in data.load("countdown", "train", countdown_config=cfg):
    for line in cd.trace(r, cfg, rng).split("\n"):
      if " = " in line:
        assert 0 <= int(line.split(" = ")[1]) <= cfg.max_value, line
  test = data.load("countdown", "test", countdown_config=cfg)
  assert [r["id"] for r in test] == [r["id"] for r in cd.generate("test", config=cfg)]
  assert templates.apply_template("countdown", test[0]["problem"]) == test[0]["problem"] + "\n"
  assert templates.reward_method("countdown") == "countdown"


def test_pretraining_demonstrations_and_length_buckets():
  """Each problem is shown `traces_per_problem` random attempts, drawn from its own seed (the same
  on any process); the retrying share follows retry_frac; short rows get a bucket of their own."""
  from explore_jax.config import defaults
  from explore_jax.demo import pretrain
  c = defaults.tiny_config("test")
  c.data.name = "countdown"
  c.data.countdown.update(train_size=100, retry_frac=0.2)
  c.pretrain.traces_per_problem = 4
  records, completions = pretrain.demonstrations(c)
  assert len(records) == len(completions) == 400
  assert [r["problem"] for r in records[:4]] == [records[0]["problem"]] * 4
  assert len(set(completions[:4])) > 1  # four different attempts at one problem
  assert pretrain.demonstrations(c)[1] == completions  # deterministic
  retrying = np.mean([", retry" in t or "check:" in t for t in completions])
  assert 0.1 < retrying < 0.3
  # Buckets: 90% of rows fit the short one; every row lands in exactly one that holds it.
  lengths = np.array([5] * 95 + [40] * 5)
  attn = (np.arange(64)[None, :] < lengths[:, None]).astype(np.int32)
  (short, a), (full, b) = pretrain.length_buckets(attn, 2)
  assert (short, full) == (16, 64) and sorted(np.concatenate([a, b]).tolist()) == list(range(100))
  assert np.all(lengths[a] <= 16) and np.all(lengths[b] > 16)
  [(only, rows)] = pretrain.length_buckets(attn, 1)
  assert only == 64 and len(rows) == 100
