"""Rewards: answer extraction, math-verify equivalence, hostile outputs, oracle over benchmarks."""

import os
import random
import signal
import threading
import time

import math_verify
import numpy as np
import pytest

from explore_jax import data, rewards

BENCHMARKS = [("math500", "test"), ("aime24", "test"), ("aime25", "test"), ("amc23", "test"),
              ("gsm8k", "test"), ("gsm8k", "train"), ("dapo_math_17k", "train")]


@pytest.fixture(scope="module")
def pool():
  with rewards.RewardPool(max_workers=2, timeout_s=10.0) as p:  # a loaded CI machine
    yield p


def _check_returns(fn, limit_s=300):
  """Run fn in a thread; fail (not hang) if it never returns."""
  out = {}
  thread = threading.Thread(target=lambda: out.setdefault("v", fn()), daemon=True)
  thread.start()
  thread.join(limit_s)
  assert "v" in out, "grading hung"
  return out["v"]


EQUIVALENT = [  # (response, gold)
    (r"so \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac12}", "0.5"),
    (r"\boxed{25}", "025"),
    (r"\boxed{025}", "25"),
    (r"\boxed{27}", "27.0"),
    (r"\boxed{1+x^2}", "x^2+1"),
    (r"\boxed{\left(3, \frac{\pi}{2}\right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}"),
    (r"First \boxed{4}, no wait: \boxed{5}", "5"),
]
NOT_EQUIVALENT = [
    (r"We get 5 along the way, so \boxed{6}", "5"),
    (r"\boxed{6} but actually 5", "5"),
    (r"the answer is 5", "5"),  # no \boxed{}: no final answer
    (r"\boxed{0.51}", r"\frac{1}{2}"),
    (r"\boxed{x^2-1}", "x^2+1"),
]


def test_equivalent_and_wrong_forms(pool):
  responses = [r for r, _ in EQUIVALENT + NOT_EQUIVALENT]
  golds = [g for _, g in EQUIVALENT + NOT_EQUIVALENT]
  expected = [1.0] * len(EQUIVALENT) + [-1.0] * len(NOT_EQUIVALENT)
  np.testing.assert_array_equal(pool.score(responses, golds), expected)
  # Same verdicts with every answer through math-verify, and math-verify itself agrees.
  np.testing.assert_array_equal(pool.check(responses, golds, fast_path=False),
                                np.array(expected) > 0)
  for (resp, gold), want in zip(EQUIVALENT[:8], expected):
    assert math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(resp)) == (want > 0)


def test_dapo_answer_line(pool):
  responses = ["Work: 5 apples.\nAnswer: 6", "blah\nAnswer: $\\frac{1}{2}$", "answer:  025.",
               "Answer: 5\nActually no.\nAnswer: 7", "The answer is 5", "Answer:\n5",
               "Answer: \\boxed{12}"]
  golds = ["6", "0.5", "25", "5", "5", "5", "12"]
  np.testing.assert_array_equal(pool.score(responses, golds, method="dapo"),
                                [1, 1, 1, -1, -1, -1, 1])
  assert rewards.last_answer_line("x\nAnswer: $3$ \ny") == "3"


def test_configurable_values_and_one_shot_score():
  out = rewards.score([r"\boxed{2}", r"\boxed{3}", "Answer: 2"], ["2", "2", "2"], timeout_s=2.0,
                      correct_reward=1.0, incorrect_reward=0.0, max_workers=1)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="unknown reward method"):
    rewards.score(["x"], ["1"], method="nope")
  with pytest.raises(ValueError, match="2 responses but 1 answers"):
    rewards.score(["x", "y"], ["1"])


HOSTILE = [
    r"\boxed{9^{9^{9^9}}}",
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "{" * 200000 + r"\boxed{1}",  # braces before the answer: cut away by the tail truncation
    "x" * (1 << 20) + r" \boxed{2}",
    b"\xff\xfe\xfa junk \\boxed{\xff\xc3}",
    "surrogates \ud800\udfff \\boxed{\ud800}",
    r"\boxed{1 + ",
    r"\boxed{\frac{1}{0}}",
    "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
]
HOSTILE_GOLD = ["1", "1", "2", "3", "1", "1", "1", "1", "2"]


def test_hostile_outputs_score_incorrect_without_hanging(pool):
  result = _check_returns(lambda: pool.score(HOSTILE, HOSTILE_GOLD))
  np.testing.assert_array_equal(result, [-1.0] * len(HOSTILE))
  # The pool still grades normally afterwards (killed workers were replaced).
  np.testing.assert_array_equal(pool.score([r"\boxed{\frac{2}{4}}"], ["0.5"]), [1.0])


def test_a_hostile_reference_costs_its_timeout_once_per_run(capfd, caplog):
  """A reference that math-verify cannot parse in time (96k characters) or cannot compare in
  time (9^{9^{9^9}}: parsed at once, evaluated by any comparison) is tried once per pool, then
  its responses score incorrect at no cost; math-verify's log of the whole text is not printed;
  a warning names each once. Ordinary references are not affected."""
  long_gold = r"\frac{1}{2}+" * 8000 + "1"
  golds = [long_gold, "9^{9^{9^9}}"]
  # 2.5 s: math-verify's own timeout is 2 s (whole seconds), the pool's deadline 2.5 s.
  with rewards.RewardPool(max_workers=2, timeout_s=2.5) as p:
    p.score([r"\boxed{1}"], ["1"])  # the workers are up
    start = time.monotonic()
    first = p.score([r"\boxed{5}", r"\boxed{x+1}"] * 2, golds * 2)
    first_s = time.monotonic() - start
    start = time.monotonic()
    for _ in range(3):
      again = p.score([r"\boxed{6}", r"\boxed{7}"] * 4, golds * 4)
    again_s = time.monotonic() - start
    assert set(p.bad_golds) == set(golds)
    assert p.score([r"\boxed{\frac{2}{4}}", r"\boxed{3}"], ["0.5", "2+1"]).tolist() == [1.0, 1.0]
  assert first.tolist() == [-1.0] * 4 and again.tolist() == [-1.0] * 8
  assert first_s < 3 * 2.5 and again_s < 1.0, (first_s, again_s)
  out, err = capfd.readouterr()
  assert "frac{1}{2}+" * 20 not in out + err and len(out + err) < 5000, (len(out), len(err))
  warned = [r.getMessage() for r in caplog.records if "reference answer" in r.getMessage()]
  assert len(warned) == 2 and any("(96,001 characters)" in w for w in warned), warned


def test_crashed_worker_is_replaced(pool):
  pool.score([r"\boxed{\frac12}"], ["0.5"])  # make sure workers exist
  killed_before = pool.killed
  for w in pool._workers:  # pylint: disable=protected-access
    os.kill(w.process.pid, signal.SIGKILL)
  out = _check_returns(lambda: pool.score([r"\boxed{\sqrt{4}}", r"\boxed{\frac{6}{3}}"],
                                          ["2", "2"]))
  # A worker found dead gets replaced; a task it held scores -1, later ones are graded.
  assert pool.killed >= killed_before + 1
  assert pool.score([r"\boxed{\sqrt{9}}"], ["3"])[0] == 1.0
  assert set(out.tolist()) <= {1.0, -1.0}


def test_worker_that_cannot_be_sent_to_is_replaced():
  """A worker found dead when a task is sent to it (the send itself fails) is replaced at once,
  and the task goes to its replacement."""
  with rewards.RewardPool(max_workers=1, timeout_s=10.0) as p:
    p.score([r"\boxed{\frac12}"], ["0.5"])  # the worker exists and is ready
    w = p._workers[0]  # pylint: disable=protected-access
    os.kill(w.process.pid, signal.SIGKILL)
    w.process.wait()
    w.conn.close()  # every send to it now raises OSError
    out = _check_returns(lambda: p.score([r"\boxed{\sqrt{4}}"], ["2"]), limit_s=120)
    assert out.tolist() == [1.0]
    assert p.killed == 1


def test_overlong_penalty_matches_dapo_formula():
  max_len, cache = 100, 20
  lengths = np.arange(0, 130)
  expected = []
  for n in lengths:  # slow reference: DAPO's piecewise definition
    if n <= max_len - cache:
      expected.append(0.0)
    elif n <= max_len:
      expected.append(((max_len - cache) - n) / cache)
    else:
      expected.append(-1.0)
  np.testing.assert_allclose(rewards.overlong_penalty(lengths, max_len, cache), expected,
                             atol=1e-6)
  assert rewards.overlong_penalty([90], max_len, cache, penalty=0.5)[0] == pytest.approx(-0.25)


def test_last_boxed_matches_braces():
  assert rewards.last_boxed(r"\boxed{a} \boxed{\frac{1}{2}} tail") == r"\frac{1}{2}"
  assert rewards.last_boxed(r"\boxed{a} \boxed{b") is None
  assert rewards.last_boxed("no box") is None


def _oracle(pool, recs, fast_path):
  golds = [r["answer"] for r in recs]
  ok = pool.check([f"Thus the final answer is \\boxed{{{a}}}." for a in golds], golds,
                  fast_path=fast_path)
  failures = [(r["id"], r["answer"]) for r, o in zip(recs, ok) if not o]
  return ok.mean(), failures


def _wrong(answer: str) -> str:
  value = rewards.as_number(answer)
  return str(value + 1) if value is not None and value.denominator == 1 else "-987654"


@pytest.mark.parametrize("name,split", BENCHMARKS)
def test_oracle_every_record(pool, name, split):
  recs = list(data.load(name, split))
  rate, failures = _oracle(pool, recs, fast_path=True)
  # No known exceptions: every reference answer is extracted and accepted.
  assert rate >= 0.99 and not failures, failures[:20]
  wrong = pool.check([f"\\boxed{{{_wrong(r['answer'])}}}" for r in recs],
                     [r["answer"] for r in recs])
  assert not wrong.any(), [r["answer"] for r, w in zip(recs, wrong) if w][:20]


@pytest.mark.parametrize("name,split,sample", [("math500", "test", None), ("aime24", "test", None),
                                               ("aime25", "test", None), ("amc23", "test", None),
                                               ("dapo_math_17k", "train", 300)])
def test_oracle_through_math_verify(pool, name, split, sample):
  recs = list(data.load(name, split))
  if sample:
    recs = random.Random(0).sample(recs, sample)
  rate, failures = _oracle(pool, recs, fast_path=False)
  assert rate >= 0.99, failures


@pytest.mark.slow
def test_oracle_through_math_verify_full_dapo():
  with rewards.RewardPool(timeout_s=5.0) as p:
    rate, failures = _oracle(p, list(data.load("dapo_math_17k", "train")), fast_path=False)
  assert rate >= 0.99, failures[:50]
