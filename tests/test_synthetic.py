"""Synthetic arithmetic task: answers against Python's own evaluation, splits, determinism."""

import ast
import re

import pytest

from explore_jax import rewards
from explore_jax.data import synthetic
from explore_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def train():
  return synthetic.generate("train", 3000)


@pytest.fixture(scope="module")
def test():
  return synthetic.generate("test", 300)


def test_answers_and_steps_match_python_eval(train):
  for r in train:
    expr = r["problem"][len("Compute "):-1]
    assert int(r["answer"]) == eval(expr)  # pylint: disable=eval-used
    lines = r["solution"].split("\n")
    assert lines[-1] == f"\\boxed{{{r['answer']}}}"
    assert len(lines) - 1 == r["num_operands"] - 1
    for line in lines[:-1]:
      a, op, b, eq, c = line.split(" ")
      assert eq == "=" and eval(f"{a} {op} {b}") == int(c)  # pylint: disable=eval-used
    # the answer of the last step is the final answer
    assert lines[-2].endswith(f"= {r['answer']}")


def _post_order(node):
  """Steps of Python's own parse of an expression, as "a op b = c" lines (independent of
  synthetic.parse/solve)."""
  if isinstance(node, ast.Constant):
    return node.value, []
  a, left = _post_order(node.left)
  b, right = _post_order(node.right)
  op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}[type(node.op)]
  c = eval(f"{a} {op} {b}")  # pylint: disable=eval-used
  return c, left + right + [f"{a} {op} {b} = {c}"]


def test_solution_steps_follow_the_printed_expression(train):
  """The step order is a function of the problem text: "Compute 4 + 9 + 1." is solved
  "4 + 9 = 13", "13 + 1 = 14" whatever tree it was drawn from."""
  chained = 0
  for r in train:
    expr = r["problem"][len("Compute "):-1]
    _, steps = _post_order(ast.parse(expr, mode="eval").body)
    assert r["solution"].split("\n")[:-1] == steps, (r["problem"], r["solution"])
    chained += bool(re.search(r"\d [+*] \d+ [+*] \d", expr))
  assert chained > 100  # the case where a drawn tree and the printed one can differ is common


def test_minimal_parentheses(train):
  # Dropping any one pair of parentheses must change the parse tree (else it was not needed);
  # Python's grammar has the same precedence and left-associativity.
  for r in train[:500]:
    expr = r["problem"][len("Compute "):-1]
    for m in re.finditer(r"\(", expr):
      depth, j = 0, m.start()
      for j in range(m.start(), len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[j], 0)
        if depth == 0:
          break
      dropped = expr[:m.start()] + expr[m.start() + 1:j] + expr[j + 1:]
      assert ast.dump(ast.parse(dropped)) != ast.dump(ast.parse(expr)), expr


def test_difficulty_knobs_and_lengths(train):
  for r in train:
    numbers = [int(x) for x in re.findall(r"\d+", r["problem"])]
    assert 2 <= len(numbers) <= 4 and all(1 <= x <= 19 for x in numbers)
    assert len(r["problem"]) <= 40
    assert all(0 <= int(s.rsplit(" ", 1)[1]) <= 999 for s in r["solution"].split("\n")[:-1])
  cfg = synthetic.ArithmeticConfig(min_operands=3, max_operands=3, max_number=5, seed=1)
  hard = synthetic.generate("train", 200, cfg)
  assert all(len(re.findall(r"\d+", r["problem"])) == 3 for r in hard)
  assert all(max(int(x) for x in re.findall(r"\d+", r["problem"])) <= 5 for r in hard)


def test_deterministic_unique_and_disjoint(train, test):
  assert synthetic.generate("train", 3000) == train
  other = synthetic.generate("train", 3000, synthetic.ArithmeticConfig(seed=1))
  assert [r["problem"] for r in other] != [r["problem"] for r in train]
  train_p = {r["problem"] for r in train} | {r["problem"] for r in other}
  test_p = {r["problem"] for r in test}
  assert len(train_p) >= 3000 and len(test_p) == len(test) == 300
  assert not train_p & test_p
  assert all(synthetic.split_of(p, 10) == "test" for p in test_p)


def test_solutions_grade_correct_and_fit_the_tokenizer(tmp_path, test):
  tok = tokenizer_lib.build_tiny_tokenizer(str(tmp_path / "tok"))
  assert max(len(tok.encode(r["solution"])) for r in test) <= 60
  with rewards.RewardPool(max_workers=1, timeout_s=5.0) as pool:
    ok = pool.check([r["solution"] for r in test], [r["answer"] for r in test])
    wrong = pool.check([r["solution"] for r in test[1:]] + [test[0]["solution"]],
                       [r["answer"] for r in test])
  assert ok.all()
  same = sum(a["answer"] == b["answer"] for a, b in zip(test, test[1:] + test[:1]))
  assert wrong.sum() == same  # only coincidentally equal answers pass


def test_direct_answer_demonstrations(train):
  """pretrain.direct_answer_frac: that share of problems is demonstrated by the bare boxed answer,
  the same problems whatever the seed or list they come in; 0 and 1 are none and all."""
  frac = 0.3
  direct = [r for r in train if synthetic.answers_directly(r["problem"], frac)]
  assert abs(len(direct) / len(train) - frac) < 0.03  # 3000 draws: 3 standard errors
  for r in train[:200]:
    text = synthetic.completion_text(r, frac)
    if synthetic.answers_directly(r["problem"], frac):
      assert text == "\\boxed{" + r["answer"] + "}"
    else:
      assert text == r["solution"] and text.count("\n") == r["num_operands"] - 1
  # Nested: the problems answered directly at 0.3 are also answered directly at 0.5.
  assert all(synthetic.answers_directly(r["problem"], 0.5) for r in direct)
  assert not any(synthetic.answers_directly(r["problem"], 0.0) for r in train)
  assert all(synthetic.answers_directly(r["problem"], 1.0) for r in train)
  assert [synthetic.completion_text(r) for r in train[:50]] == [r["solution"] for r in train[:50]]
  with pytest.raises(ValueError, match="direct_answer_frac"):
    synthetic.answers_directly("Compute 1 + 2.", 1.5)
