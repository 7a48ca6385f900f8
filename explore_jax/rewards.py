"""Verifiable rewards: grade final answers, +1 correct / -1 otherwise, never hang.

Two answer formats:
  method="math_verify"  the content of the LAST `\\boxed{...}` of the response, compared with the
                        reference by math-verify (Qwen2.5-Math prompt).
  method="dapo"         the LAST "Answer: ..." line (DAPO prompt), compared as a normalised string,
                        as a number, then through math-verify.
  method="countdown"    the LAST `\\boxed{...}` is an expression, evaluated by
                        `data.countdown.is_solution` against "target|numbers" (bounded, in-process).
A response without an extractable answer is incorrect; a correct number earlier in the text does
not count.

Where the time goes and why a process pool: extraction is a linear scan done in the caller (and
the cheap exact/numeric comparisons with it), so most responses never leave the trainer's process.
What remains goes to math-verify, whose parser and sympy can blow up on hostile text (9^{9^{9^9}}
evaluates a 370-million-digit integer in C, where no signal can interrupt it). math-verify's own
timeouts use SIGALRM, which works only in a main thread, so each grading runs in the main thread of
a worker PROCESS, with math-verify's timeout as the soft limit and the pool's deadline as the hard
one: a worker past its deadline is killed (SIGKILL) and replaced, and its response scores as
incorrect. Every dispatched response has a deadline, so `RewardPool.check` returns after at most
about ceil(n / workers) * timeout_s.

Workers are fresh interpreters (never forks of the trainer, whose JAX threads must not be
copied, nor multiprocessing children, which re-run the caller's `__main__`); a pool keeps them
across calls, and a replacement costs one import of math-verify (about a second). Their standard
output and math-verify's own log are discarded: math-verify logs the whole text it timed out on
(a 100k-character answer once landed in the trainer's log).

Reference answers: before a reference goes to math-verify with responses, a worker parses it
alone and compares it with a plain number, once per pool (a run); one that does not parse (or
compare) within the timeout is remembered, its responses score as incorrect without another
try, and a warning names it once.
So a hostile reference costs its timeout once per run, not once per response drawn against it.
"""

from __future__ import annotations

from collections.abc import Sequence
import fractions
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zlib

import numpy as np

METHODS = ("math_verify", "dapo", "countdown")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_CHARS = 10_000  # responses are cut to their last MAX_CHARS characters before parsing
MAX_ANSWER_CHARS = 1_000  # an extracted final answer longer than this is incorrect
MAX_DEPTH = 32  # so is one with braces nested deeper than this


# --------------------------------------------------------------------------------------------------
# Extraction and normalisation (pure, linear time; run in the caller)
# --------------------------------------------------------------------------------------------------


def sanitize(response: str | bytes) -> str:
  """Valid UTF-8 text of at most MAX_CHARS characters (the tail, where the answer is)."""
  if isinstance(response, bytes):
    response = response[-4 * MAX_CHARS:].decode("utf-8", errors="replace")
  response = response[-MAX_CHARS:]
  # Lone surrogates (from errors="surrogateescape" decoding) would break regexes and pickling.
  return response.encode("utf-8", errors="replace").decode("utf-8")


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (braces matched), None if absent or unterminated."""
  starts = [m.end() for m in _BOXED.finditer(text)]
  for start in reversed(starts):  # an unterminated last box falls back to none, not an earlier one
    depth = 1
    for i in range(start, len(text)):
      c = text[i]
      if c == "{":
        depth += 1
      elif c == "}":
        depth -= 1
        if depth == 0:
          return text[start:i]
    return None
  return None


_ANSWER_LINE = re.compile(r"(?i)answer\s*:[ \t]*([^\n]*)")


def last_answer_line(text: str) -> str | None:
  """What follows the last "Answer:" (DAPO format), None if absent or empty."""
  matches = _ANSWER_LINE.findall(text)
  if not matches:
    return None
  answer = matches[-1].strip()
  boxed = last_boxed(answer)
  if boxed is not None:
    answer = boxed
  answer = answer.strip().strip("$").strip()
  return answer or None


_STRIP = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\displaystyle", "^\\circ", "^{\\circ}", "\\%",
          "%", "$", " ")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def normalize(answer: str) -> str:
  """A light canonical form for exact comparison (never makes unequal numbers equal)."""
  s = _TEXT.sub(r"\1", answer)
  for token in _STRIP:
    s = s.replace(token, "")
  s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").rstrip(".")
  if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
    s = s.replace(",", "")
  return s


def as_number(answer: str) -> fractions.Fraction | None:
  """Exact value of a plain decimal ("025", "27.0", "-0.5"), else None."""
  s = normalize(answer)
  if len(s) > 100 or not _NUMBER.fullmatch(s):
    return None
  return fractions.Fraction(s)


# --------------------------------------------------------------------------------------------------
# Grading (math-verify part runs in a worker process)
# --------------------------------------------------------------------------------------------------


def _depth(text: str) -> int:
  depth = deepest = 0
  for c in text:
    if c == "{":
      depth += 1
      deepest = max(deepest, depth)
    elif c == "}":
      depth -= 1
  return deepest


def quick_check(extracted: str | None, gold: str) -> bool | None:
  """True/False when decidable without math-verify (no answer, equal strings, plain numbers)."""
  if extracted is None or len(extracted) > MAX_ANSWER_CHARS or _depth(extracted) > MAX_DEPTH:
    return False  # no final answer is that long or that nested: hostile or degenerate text
  if normalize(extracted) == normalize(gold):
    return True
  a, b = as_number(extracted), as_number(gold)
  if a is not None and b is not None:
    return a == b
  return None


def extract(response: str, method: str) -> str | None:
  if method in ("math_verify", "countdown"):
    return last_boxed(response)
  if method == "dapo":
    return last_answer_line(response)
  raise ValueError(f"unknown reward method {method!r}; expected one of {METHODS}")


def _countdown_solution(extracted: str | None, key: str) -> bool:
  # Imported here: explore_jax.data imports TFDS, which the reward workers must not pay for.
  from explore_jax.data import countdown  # pylint: disable=g-import-not-at-top
  return countdown.is_solution(extracted, key)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int):
  import math_verify  # pylint: disable=g-import-not-at-top
  return math_verify.parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)


def verify_extracted(extracted: str, gold: str, timeout_s: float) -> bool:
  """math-verify comparison of an extracted answer with the reference (main thread only)."""
  import math_verify  # pylint: disable=g-import-not-at-top
  timeout = max(1, int(timeout_s))  # SIGALRM has whole-second resolution
  gold_parsed = _parse_gold(gold, timeout)
  config = [math_verify.LatexExtractionConfig(boxed_match_priority=0),
            math_verify.ExprExtractionConfig()]
  pred = math_verify.parse(f"\\boxed{{{extracted}}}", extraction_config=config,
                           parsing_timeout=timeout)
  if not gold_parsed or not pred:
    return False
  return bool(math_verify.verify(gold_parsed, pred, timeout_seconds=timeout))


def grade(response: str | bytes, gold: str, method: str = "math_verify",
          timeout_s: float = 5.0) -> bool:
  """One response, in-process (no hard timeout: use RewardPool for untrusted text)."""
  extracted = extract(sanitize(response), method)
  if method == "countdown":
    return _countdown_solution(extracted, str(gold))
  decided = quick_check(extracted, str(gold))
  if decided is not None:
    return decided
  try:
    return verify_extracted(extracted, str(gold), timeout_s)
  except Exception:  # pylint: disable=broad-except
    return False


def _gold_is_tractable(gold: str, timeout_s: float) -> bool:
  """Whether math-verify parses the reference and compares it with a plain number within the
  timeout (9^{9^{9^9}} parses at once, then any comparison evaluates it). Its own timeouts
  return [] / False, so the clock says whether one fired."""
  soft = max(1, int(timeout_s))  # math-verify's own timeout (SIGALRM: whole seconds)
  start = time.monotonic()
  if not _parse_gold(gold, soft):  # [] also on math-verify's timeout
    return False
  verify_extracted("0", gold, timeout_s)
  return time.monotonic() - start < soft


def _quiet_math_verify() -> None:
  """math-verify's log (a timeout logs the whole text it was parsing) goes nowhere: the pool
  reports what matters (a reference that does not parse) itself."""
  log = logging.getLogger("math_verify")
  log.addHandler(logging.NullHandler())
  log.propagate = False


def _worker_main(fd: int) -> None:
  """Worker loop: (task id, extracted, gold, timeout) in, (task id, correct) out. With extracted
  None, the task parses the reference alone: "correct" says whether it parsed in time."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
  conn = multiprocessing.connection.Connection(fd)
  _quiet_math_verify()
  import math_verify  # pylint: disable=g-import-not-at-top,unused-import
  conn.send("ready")  # deadlines start after the import, not during it
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return  # the pool went away
    if msg is None:
      return
    task_id, extracted, gold, timeout_s = msg
    try:
      if extracted is None:
        ok = _gold_is_tractable(gold, timeout_s)
      else:
        ok = verify_extracted(extracted, gold, timeout_s)
    except BaseException:  # pylint: disable=broad-except
      ok = False  # parse errors, RecursionError, math-verify's TimeoutException
    conn.send((task_id, ok))


# --------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------


_STARTUP_S = 120.0  # a worker that has not imported math-verify by then is broken


class _Worker:
  """One grading process, started fresh (`python -c`), talking over a socket pair.

  A fresh interpreter rather than multiprocessing's fork/forkserver/spawn: forking would copy the
  trainer's JAX threads, and spawn/forkserver children re-run the caller's `__main__` module.
  """

  def __init__(self):
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT, env.get("PYTHONPATH")]))
    code = ("import sys; from explore_jax.rewards import _worker_main; "
            "_worker_main(int(sys.argv[1]))")
    # stdout: nothing of the worker's is the caller's (tasks and results go over the socket);
    # stderr stays, for a crash's traceback.
    self.process = subprocess.Popen(
        [sys.executable, "-c", code, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    theirs.close()
    self.conn = multiprocessing.connection.Connection(ours.detach())
    self.ready = False  # set by the worker's first message, once math-verify is imported
    self.task: int | None = None
    self.deadline = time.monotonic() + _STARTUP_S

  def kill(self) -> None:
    self.process.kill()
    self.process.wait()
    self.conn.close()


class RewardPool:
  """A bounded pool of grading processes, reused across trainer steps.

    with RewardPool(max_workers=4, timeout_s=5.0) as pool:
      rewards = pool.score(responses, answers, method="math_verify")

  Workers start on first use (about a second: they import math-verify and sympy) and are kept.
  """

  def __init__(self, max_workers: int | None = None, timeout_s: float = 5.0):
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    self.max_workers = max_workers or len(os.sched_getaffinity(0))
    self.timeout_s = timeout_s
    self.killed = 0  # workers killed past their deadline or found dead, over the pool's life
    self.bad_golds: set[str] = set()  # references math-verify could not parse in time
    self._good_golds: set[str] = set()
    self._failed_starts = 0
    self._workers: list[_Worker] = []

  def __enter__(self) -> "RewardPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    for w in self._workers:
      try:
        w.conn.send(None)
      except OSError:
        pass
    for w in self._workers:
      try:
        w.process.wait(timeout=1)
      except subprocess.TimeoutExpired:
        w.process.kill()
        w.process.wait()
      w.conn.close()
    self._workers = []

  def _replace(self, i: int) -> None:
    w = self._workers[i]
    if not w.ready:
      self._failed_starts += 1
      if self._failed_starts > 2 * self.max_workers:
        self.close()
        raise RuntimeError(f"reward workers keep dying before they are ready (exit code "
                           f"{w.process.poll()}); see their stderr above")
    else:
      self.killed += 1
    w.kill()
    self._workers[i] = _Worker()

  def _run(self, tasks: list[tuple[int, str | None, str]]) -> dict[int, bool | None]:
    """math-verify over (index, extracted, gold); a timed-out task is False, one whose worker
    died before its deadline None (not the task's doing, as far as anyone knows)."""
    results: dict[int, bool | None] = {}
    while len(self._workers) < min(self.max_workers, len(tasks)):
      self._workers.append(_Worker())
    # Tasks queue at the worker their reference answer hashes to, so each worker parses (and
    # caches) each reference once: a group's n responses share one. An idle worker whose queue
    # is empty takes from the longest other queue, so no worker idles while tasks wait.
    queues: list[list[tuple[int, str, str]]] = [[] for _ in self._workers]
    for task in reversed(tasks):
      queues[zlib.crc32(task[2].encode()) % len(queues)].append(task)
    while any(queues) or any(w.task is not None for w in self._workers):
      for j, w in enumerate(self._workers):
        if w.ready and w.task is None and any(queues):
          queue = queues[j] if queues[j] else max(queues, key=len)
          task_id, extracted, gold = queue.pop()
          try:
            w.conn.send((task_id, extracted, gold, self.timeout_s))
            w.task, w.deadline = task_id, time.monotonic() + self.timeout_s
          except OSError:  # died while idle: replace it; the task waits for the next worker
            queue.append((task_id, extracted, gold))
            self._replace(j)
      waiting = [w for w in self._workers if w.task is not None or not w.ready]
      wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
      ready = multiprocessing.connection.wait([w.conn for w in waiting], timeout=wait_s)
      now = time.monotonic()
      for i, w in enumerate(self._workers):
        if w not in waiting:
          continue
        if w.conn in ready:
          try:
            msg = w.conn.recv()
          except (EOFError, OSError):  # crashed: fall through to replacement
            msg = None
          if msg == "ready":
            w.ready, w.deadline = True, math.inf
            continue
          if msg is not None:
            task_id, ok = msg
            results[task_id] = bool(ok) and task_id == w.task
            w.task, w.deadline = None, math.inf
            continue
        elif now < w.deadline:
          continue
        if w.task is not None:
          results[w.task] = False if now >= w.deadline else None
        self._replace(i)
    return results

  def check(self, responses: Sequence[str | bytes], answers: Sequence[str],
            method: str = "math_verify", *, fast_path: bool = True) -> np.ndarray:
    """[n] bool: is each response's final answer equal to its reference answer.

    `fast_path=False` sends every extracted answer to math-verify, even those that equal the
    reference as strings or plain numbers (to audit math-verify itself).
    """
    if len(responses) != len(answers):
      raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    correct = np.zeros(len(responses), bool)
    tasks = []
    for i, (response, gold) in enumerate(zip(responses, answers)):
      extracted = extract(sanitize(response), method)
      if method == "countdown":  # an expression to evaluate, never math-verify's business
        correct[i] = _countdown_solution(extracted, str(gold))
        continue
      decided = quick_check(extracted, str(gold))
      if decided is None or (decided and not fast_path):
        tasks.append((i, extracted, str(gold)))
      else:
        correct[i] = decided
    self._parse_golds({gold for _, _, gold in tasks})
    for i, ok in self._run([t for t in tasks if t[2] not in self.bad_golds]).items():
      correct[i] = bool(ok)
    return correct

  def _parse_golds(self, golds: set[str]) -> None:
    """Try each reference not seen before alone (`_gold_is_tractable`, once per pool);
    remember those that fail."""
    new = sorted(golds - self._good_golds - self.bad_golds)
    if not new:
      return
    for i, ok in self._run([(i, None, gold) for i, gold in enumerate(new)]).items():
      if ok is None:  # its worker died (killed from outside): tried again next time
        continue
      if ok:
        self._good_golds.add(new[i])
        continue
      self.bad_golds.add(new[i])
      shown = new[i] if len(new[i]) <= 80 else f"{new[i][:60]}... ({len(new[i]):,} characters)"
      logging.warning("reward: math-verify could not parse and compare the reference answer %r "
                      "within %g s; every response graded against it counts as incorrect from "
                      "now on", shown, self.timeout_s)

  def score(self, responses: Sequence[str | bytes], answers: Sequence[str], *,
            method: str = "math_verify", correct_reward: float = 1.0,
            incorrect_reward: float = -1.0) -> np.ndarray:
    """[n] float32 rewards."""
    correct = self.check(responses, answers, method)
    return np.where(correct, correct_reward, incorrect_reward).astype(np.float32)


def score(responses: Sequence[str | bytes], answers: Sequence[str], *,
          method: str = "math_verify", timeout_s: float = 5.0, correct_reward: float = 1.0,
          incorrect_reward: float = -1.0, max_workers: int | None = None) -> np.ndarray:
  """[n] float32 rewards through a pool that lives for this call (use RewardPool in a loop)."""
  if method not in METHODS:
    raise ValueError(f"unknown reward method {method!r}; expected one of {METHODS}")
  with RewardPool(max_workers=max_workers, timeout_s=timeout_s) as pool:
    return pool.score(responses, answers, method=method, correct_reward=correct_reward,
                      incorrect_reward=incorrect_reward)


def overlong_penalty(lengths, max_length: int, cache_length: int,
                     penalty: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment, added to the reward: [n] float32, in [-penalty, 0].

  0 up to max_length - cache_length tokens, then linear down to -penalty at max_length (and
  -penalty beyond).
  """
  if not 0 < cache_length <= max_length:
    raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
  lengths = np.asarray(lengths, np.float64)
  excess = lengths - (max_length - cache_length)
  return np.clip(-excess / cache_length * penalty, -penalty, 0.0).astype(np.float32)
