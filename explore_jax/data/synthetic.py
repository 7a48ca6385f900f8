"""Synthetic verifiable task for the CPU default: multi-step integer arithmetic.

A problem is a random expression tree over small positive integers, printed with the fewest
parentheses ("Compute (3 + 4) * 5 - 2."). Its worked solution evaluates one operation per line in
post-order of the expression as printed (usual precedence, left to right) and ends with the answer
in `\\boxed{}`:

    3 + 4 = 7
    7 * 5 = 35
    35 - 2 = 33
    \\boxed{33}

Texts are short on purpose (problem <= ~40 characters, solution <= ~60 tokens of the tiny
tokenizer) so that a model of a few million parameters learns the format in minutes on a CPU and
then has room to improve under RL. Difficulty: the number of operands, the size of the numbers and
a bound on every intermediate value (`ArithmeticConfig`).

Splits are disjoint by construction: a problem belongs to the test split iff a hash of its text
falls in the first `test_percent` buckets, whatever the seed, so no seed or size can leak a test
problem into training. Within a split problems are unique; generation is deterministic by seed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import random
from typing import Any

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  min_operands: int = 2
  max_operands: int = 4
  max_number: int = 19  # operands are drawn from 1..max_number
  max_value: int = 999  # every intermediate result lies in [0, max_value] (negatives optional)
  allow_negative: bool = False
  ops: str = "+-*"
  train_size: int = 20000
  test_size: int = 500
  test_percent: int = 10  # share of the problem space reserved for the test split
  seed: int = 0

  def __post_init__(self):
    if not 2 <= self.min_operands <= self.max_operands:
      raise ValueError(f"need 2 <= min_operands <= max_operands, got {self.min_operands}, "
                       f"{self.max_operands}")
    if self.max_number < 1 or not self.ops or set(self.ops) - set(_PRECEDENCE):
      raise ValueError(f"bad max_number={self.max_number} or ops={self.ops!r} (allowed: +-*)")
    if not 0 < self.test_percent < 100:
      raise ValueError(f"test_percent must be in (0, 100), got {self.test_percent}")


# A tree is an int leaf or a tuple (op, left, right).


def _random_tree(rng: random.Random, n: int, cfg: ArithmeticConfig):
  # int(random() * k) rather than randint: a third of the cost, and generation is draw-bound.
  if n == 1:
    return 1 + int(rng.random() * cfg.max_number)
  left = 1 + int(rng.random() * (n - 1))
  op = cfg.ops[int(rng.random() * len(cfg.ops))]
  return (op, _random_tree(rng, left, cfg), _random_tree(rng, n - left, cfg))


def render(tree) -> str:
  """Infix text with only the parentheses that precedence and left-associativity require."""
  if isinstance(tree, int):
    return str(tree)
  op, left, right = tree
  text_l, text_r = render(left), render(right)
  if isinstance(left, tuple) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
    text_l = f"({text_l})"
  # a - (b + c), a * (b - c): the right operand needs parentheses at equal precedence for "-".
  if isinstance(right, tuple) and (_PRECEDENCE[right[0]] < _PRECEDENCE[op] or
                                   (_PRECEDENCE[right[0]] == _PRECEDENCE[op] and op == "-")):
    text_r = f"({text_r})"
  return f"{text_l} {op} {text_r}"


def solve(tree) -> tuple[int, list[str]]:
  """(value, one "a op b = c" line per operation in post-order)."""
  if isinstance(tree, int):
    return tree, []
  op, left, right = tree
  a, steps_l = solve(left)
  b, steps_r = solve(right)
  c = a + b if op == "+" else a - b if op == "-" else a * b
  return c, steps_l + steps_r + [f"{a} {op} {b} = {c}"]


def _in_range(steps: list[str], cfg: ArithmeticConfig) -> bool:
  low = -cfg.max_value if cfg.allow_negative else 0
  return all(low <= int(step.rsplit(" ", 1)[1]) <= cfg.max_value for step in steps)


def split_of(problem: str, test_percent: int) -> str:
  bucket = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "little") % 100
  return "test" if bucket < test_percent else "train"


_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def parse(text: str):
  """The tree a reader sees in an expression: usual precedence, left-associative ("1 + 2 + 3"
  is (1 + 2) + 3). A worked solution follows this tree, never the one the text was drawn from:
  "4 + 9 + 1" from the draw 4 + (9 + 1) would otherwise start with "9 + 1 = 10", a step order
  the problem text cannot predict."""

  def tree(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
      return (_AST_OPS[type(node.op)], tree(node.left), tree(node.right))
    raise ValueError(f"not an arithmetic expression of + - * over integers: {text!r}")

  return tree(ast.parse(text, mode="eval").body)


def _example(problem: str, value: int, steps: list[str], index: int, split: str):
  return {
      "id": f"arith-{split}-{index}",
      "problem": problem,
      "answer": str(value),
      "solution": "\n".join(steps + [f"\\boxed{{{value}}}"]),
      "num_operands": len(steps) + 1,
  }


def generate(split: str, size: int | None = None,
             config: ArithmeticConfig = ArithmeticConfig()) -> list[dict[str, Any]]:
  """`size` unique problems of `split` ("train" or "test"), deterministic in `config.seed`."""
  if split not in SPLITS:
    raise ValueError(f"synthetic_arithmetic has splits {SPLITS}, got {split!r}")
  if size is None:
    size = config.train_size if split == "train" else config.test_size
  # random.Random seeded by a string is reproducible across platforms and Python versions, and
  # an order of magnitude cheaper per draw than numpy's Generator for scalar draws.
  rng = random.Random(f"synthetic_arithmetic/{config.seed}/{split}")
  seen: set[str] = set()
  examples = []
  attempts = 0
  while len(examples) < size:
    attempts += 1
    if attempts > 100 * size + 10000:
      raise ValueError(f"could only generate {len(examples)} unique {split} problems of the "
                       f"{size} asked for with {config}; widen the difficulty range")
    n = config.min_operands + int(rng.random() * (config.max_operands - config.min_operands + 1))
    text = render(_random_tree(rng, n, config))
    problem = f"Compute {text}."
    if problem in seen or split_of(problem, config.test_percent) != split:
      continue
    value, steps = solve(parse(text))
    if not _in_range(steps, config):
      continue
    seen.add(problem)
    examples.append(_example(problem, value, steps, len(examples), split))
  return examples


@functools.lru_cache(maxsize=8)
def _cached(split: str, config: ArithmeticConfig) -> tuple[dict[str, Any], ...]:
  return tuple(generate(split, None, config))


def load_split(split: str, config: ArithmeticConfig = ArithmeticConfig()) -> list[dict[str, Any]]:
  """The default-size split, generated once per process (fresh dict copies per call)."""
  return [dict(r) for r in _cached(split, config)]


def answers_directly(problem: str, direct_answer_frac: float) -> bool:
  """Whether a problem's demonstration is a bare answer: a fixed share of problems, chosen by a
  hash of the text (so the same problems at any seed, size or process count)."""
  if not 0.0 <= direct_answer_frac <= 1.0:
    raise ValueError(f"direct_answer_frac must be in [0, 1], got {direct_answer_frac}")
  bucket = int.from_bytes(hashlib.sha256(f"direct/{problem}".encode()).digest()[:8], "little")
  return bucket % 10_000 < round(direct_answer_frac * 10_000)


def completion_text(record: dict[str, Any], direct_answer_frac: float = 0.0) -> str:
  """What a model is shown after the prompt (pre-training): the worked solution, or for a share
  `direct_answer_frac` of problems the bare answer, "\\boxed{33}", without any steps."""
  if answers_directly(record["problem"], direct_answer_frac):
    return f"\\boxed{{{record['answer']}}}"
  return record["solution"]
