"""Countdown, a search task where exploration matters (issue 20's CPU testbed; groundwork).

A problem gives a few small numbers and a target ("Reach 21 with 3 5 7."); a response combines two
of the numbers it has left per line until one is left, and boxes the expression it built:

    7 * 3 = 21
    21 + 5 = 26
    \\boxed{7 * 3 + 5}

The answer is checked by evaluating the boxed expression (each given number used exactly once,
only + - * and parentheses), so a guessed number scores nothing, and the space of answers is the
space of expressions. The verify-and-retry behaviour checks the value reached against the target
and, when it differs, starts again:

    7 * 3 = 21
    21 + 5 = 26
    check: 26 is not 21, retry
    5 - 3 = 2
    2 * 7 = 14
    check: 14 is not 21, retry
    ...

Why it has the four properties the paper's effect needs (issue 20):
1. Fork tokens: the first line's choice of two numbers and an operation (up to 18 choices with 3
   numbers, 36 with 4) decides the outcome; a model that has learnt the moves but not which one
   solves a problem spreads about log(choices) nats there.
2. Skewed success: `solve_rate` is exact, the share of uniformly random attempts (moves drawn
   uniformly at every line) that reach the target, and problems are kept only when it lies in
   [min_solve_rate, max_solve_rate]; a base model that imitates random attempts has about that
   p per prompt.
3. A large answer space: the reward evaluates the expression, and random boxed text is wrong.
4. A rare behaviour that raises success: a share `retry_frac` of the pre-training traces retry
   after a wrong value (up to `max_attempts` attempts), the others box their first attempt
   whatever its value. Each retry is another draw at p, so retrying raises success, and RL can
   learn to retry more: longer responses and more "check:" lines.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import hashlib
import random
from typing import Any

from explore_jax.data import synthetic  # the split of a problem text: the same rule as arithmetic's

SPLITS = ("train", "test")
MAX_EXPRESSION_CHARS = 200  # a longer boxed answer is wrong without being parsed


@dataclasses.dataclass(frozen=True)
class CountdownConfig:
  num_numbers: int = 3
  max_number: int = 9  # numbers are drawn from 1..max_number
  max_target: int = 99  # targets lie in [1, max_target]
  # Every value an attempt reaches lies in [0, max_value]: moves are drawn among those that keep
  # it there, so the traces never ask a tiny model for negatives or three-digit products.
  max_value: int = 99
  ops: str = "+-*"
  min_solve_rate: float = 0.05  # share of uniformly random attempts that reach the target
  max_solve_rate: float = 0.3
  retry_frac: float = 0.1  # share of pre-training traces that verify and retry
  max_attempts: int = 4  # attempts in a retrying trace, at most
  # 3 numbers of 1..9 with solve rates in [0.05, 0.3] make about 3,700 distinct problems, a
  # tenth of them held out: sizes beyond what the space holds cannot be generated.
  train_size: int = 3000
  test_size: int = 300
  test_percent: int = 10
  seed: int = 0

  def __post_init__(self):
    if not 2 <= self.num_numbers <= 5:
      raise ValueError(f"num_numbers must be in [2, 5], got {self.num_numbers}")
    if not self.ops or set(self.ops) - set("+-*"):
      raise ValueError(f"ops={self.ops!r}: allowed + - *")
    if not 0.0 <= self.min_solve_rate <= self.max_solve_rate <= 1.0:
      raise ValueError(f"need 0 <= min_solve_rate <= max_solve_rate <= 1, got "
                       f"{self.min_solve_rate}, {self.max_solve_rate}")
    if not 0.0 <= self.retry_frac <= 1.0 or self.max_attempts < 1:
      raise ValueError(f"bad retry_frac={self.retry_frac} or max_attempts={self.max_attempts}")


def _apply(op: str, a: int, b: int) -> int:
  return a + b if op == "+" else a - b if op == "-" else a * b


# A pool is a tuple of (value, expression text, the text's outermost operator or "" for a number):
# what an attempt still has to combine.


def _pool(numbers) -> tuple:
  return tuple((n, str(n), "") for n in numbers)


def _moves(pool, ops: str, max_value: int):
  """Every (i, j, op) an attempt may play on `pool`: ordered pairs of distinct entries whose
  result lies in [0, max_value] (the larger minus the smaller always does)."""
  return [(i, j, op) for i in range(len(pool)) for j in range(len(pool)) if i != j for op in ops
          if 0 <= _apply(op, pool[i][0], pool[j][0]) <= max_value]


def _play(pool, move):
  """(value, the line written, the pool after) of one move."""
  i, j, op = move
  (a, left, left_op), (b, right, right_op) = pool[i], pool[j]
  c = _apply(op, a, b)
  # Only the parentheses a reader needs: a sum or difference as a factor, or after a minus.
  if op == "*" and left_op in ("+", "-"):
    left = f"({left})"
  if right_op in ("+", "-") and op in ("*", "-"):
    right = f"({right})"
  rest = [p for k, p in enumerate(pool) if k not in (i, j)]
  return c, f"{a} {op} {b} = {c}", tuple(rest + [(c, f"{left} {op} {right}", op)])


@functools.lru_cache(maxsize=100_000)
def outcomes(numbers: tuple[int, ...], ops: str, max_value: int = 99) -> dict[int, float]:
  """value -> probability that a uniformly random attempt on `numbers` ends at it (exact)."""
  dist: dict[int, float] = collections.defaultdict(float)

  def walk(pool, prob):
    if len(pool) == 1:
      dist[pool[0][0]] += prob
      return
    moves = _moves(pool, ops, max_value)
    for move in moves:
      walk(_play(pool, move)[2], prob / len(moves))

  walk(_pool(numbers), 1.0)
  return dict(dist)


def solve_rate(numbers, target: int, ops: str = "+-*", max_value: int = 99) -> float:
  return outcomes(tuple(sorted(numbers)), ops, max_value).get(target, 0.0)


def random_attempt(numbers, ops: str, rng: random.Random, max_value: int = 99
                   ) -> tuple[int, list[str], str]:
  """(value, its lines, the expression) of one uniformly random attempt."""
  pool = _pool(numbers)
  lines = []
  while len(pool) > 1:
    moves = _moves(pool, ops, max_value)
    value, line, pool = _play(pool, moves[int(rng.random() * len(moves))])
    lines.append(line)
  return pool[0][0], lines, pool[0][1]


def problem_text(numbers, target: int) -> str:
  return f"Reach {target} with {' '.join(map(str, numbers))}."


def answer_key(numbers, target: int) -> str:
  """The reference a grader needs (the rewards' `answers` entry): "target|n1,n2,..."."""
  return f"{target}|{','.join(map(str, sorted(numbers)))}"


def generate(split: str, size: int | None = None,
             config: CountdownConfig = CountdownConfig()) -> list[dict[str, Any]]:
  """`size` unique problems of `split` whose solve rate lies in the config's range."""
  if split not in SPLITS:
    raise ValueError(f"countdown has splits {SPLITS}, got {split!r}")
  size = (config.train_size if split == "train" else config.test_size) if size is None else size
  rng = random.Random(f"countdown/{config.seed}/{split}")
  seen: set[str] = set()
  out = []
  attempts = 0
  while len(out) < size:
    attempts += 1
    if attempts > 200 * size + 10_000:
      raise ValueError(f"could only generate {len(out)} of {size} {split} problems with "
                       f"{config}; widen the solve-rate range")
    numbers = [1 + int(rng.random() * config.max_number) for _ in range(config.num_numbers)]
    dist = outcomes(tuple(sorted(numbers)), config.ops, config.max_value)
    targets = sorted(v for v, p in dist.items() if 1 <= v <= config.max_target
                     and config.min_solve_rate <= p <= config.max_solve_rate)
    if not targets:
      continue
    target = targets[int(rng.random() * len(targets))]
    problem = problem_text(numbers, target)
    if problem in seen or synthetic.split_of(problem, config.test_percent) != split:
      continue
    seen.add(problem)
    out.append({"id": f"countdown-{split}-{len(out)}", "problem": problem,
                "answer": answer_key(numbers, target), "numbers": numbers, "target": target,
                "solve_rate": dist[target]})
  return out


@functools.lru_cache(maxsize=8)
def _cached(split: str, config: CountdownConfig) -> tuple[dict[str, Any], ...]:
  return tuple(generate(split, None, config))


def load_split(split: str, config: CountdownConfig = CountdownConfig()) -> list[dict[str, Any]]:
  """The default-size split, generated once per process (fresh dict copies per call)."""
  return [dict(r, numbers=list(r["numbers"])) for r in _cached(split, config)]


def retries(problem: str, retry_frac: float) -> bool:
  """Whether a problem's pre-training trace verifies and retries (a fixed share, by hash)."""
  bucket = int.from_bytes(hashlib.sha256(f"retry/{problem}".encode()).digest()[:8], "little")
  return bucket % 10_000 < round(retry_frac * 10_000)


def trace(record: dict[str, Any], config: CountdownConfig, rng: random.Random) -> str:
  """One pre-training response: a random attempt boxed as it is or, for a share `retry_frac` of
  the problems, attempts checked against the target until one reaches it (or max_attempts)."""
  numbers, target = record["numbers"], record["target"]
  check = retries(record["problem"], config.retry_frac)
  lines = []
  for attempt in range(config.max_attempts if check else 1):
    value, steps, expression = random_attempt(numbers, config.ops, rng, config.max_value)
    lines += steps
    if not check:
      break
    if value == target:
      lines.append(f"check: {value} is {target}")
      break
    if attempt + 1 < config.max_attempts:
      lines.append(f"check: {value} is not {target}, retry")
  lines.append(f"\\boxed{{{expression}}}")
  return "\n".join(lines)


def count_retries(response: str) -> int:
  """How many times a response checked a wrong value and started again."""
  return response.count(", retry")


_ALLOWED = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Constant, ast.UnaryOp,
            ast.USub)


def is_solution(expression: str | None, key: str) -> bool:
  """Does `expression` (a boxed answer) use each number of `key` once and equal its target?
  Linear in the text and bounded: hostile text is rejected by length and by the node whitelist
  before anything is evaluated, and + - * over at most five one-digit numbers stays small."""
  if expression is None or len(expression) > MAX_EXPRESSION_CHARS:
    return False
  target_text, numbers_text = key.split("|")
  try:
    tree = ast.parse(expression.replace("\\times", "*").replace("\\cdot", "*"), mode="eval")
  except (SyntaxError, ValueError):
    return False
  leaves = []
  for node in ast.walk(tree):
    if not isinstance(node, _ALLOWED):
      return False
    if isinstance(node, ast.Constant):
      if type(node.value) is not int:
        return False
      leaves.append(node.value)
    if isinstance(node, ast.UnaryOp):
      return False  # "-3" is not one of the given numbers
  if sorted(leaves) != sorted(int(x) for x in numbers_text.split(",")):
    return False

  def value(node):
    if isinstance(node, ast.Expression):
      return value(node.body)
    if isinstance(node, ast.Constant):
      return node.value
    return _apply({ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}[type(node.op)], value(node.left),
                  value(node.right))

  return value(tree) == int(target_text)
