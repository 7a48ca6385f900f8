"""Reading local JSONL / JSON / parquet files into (id, problem, answer) rows.

Every dataset, the paper's benchmarks and a user's own file alike, goes through `read_rows`: it
yields one `Row` per usable record and collects one `Skipped` per malformed one (a line that is not
JSON, a record without a problem or an answer), each with its 1-based line number (JSONL) or record
number (JSON array, parquet), so that a bad row costs a warning, not the whole file.

Field names are dotted paths into nested records (`reward_model.ground_truth` for DAPO-Math-17k).
A problem field that holds a chat (a list of `{"role", "content"}` messages, as in verl-format
parquet files) yields the content of its last user message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterator

FORMATS = ("jsonl", "json", "parquet")


@dataclasses.dataclass(frozen=True)
class Row:
  id: str
  problem: str
  answer: str
  extra: dict[str, Any]  # source fields worth keeping, by builder feature name


@dataclasses.dataclass(frozen=True)
class Skipped:
  path: str
  line: int  # 1-based line (JSONL) or record number (JSON array, parquet)
  reason: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"


class MalformedRow(ValueError):
  """Raised by a row converter for a record that must be skipped."""


def file_format(path: str) -> str:
  """'jsonl', 'json' or 'parquet' from the file name."""
  lower = path.lower()
  for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
                   (".parquet", "parquet")):
    if lower.endswith(ext):
      return fmt
  raise ValueError(f"{path}: unknown file format; expected one of .jsonl, .json, .parquet")


def _raw_records(path: str, skipped: list[Skipped]) -> Iterator[tuple[int, Any]]:
  """(line number, decoded record) for every record; undecodable lines go to `skipped`."""
  fmt = file_format(path)
  if fmt == "parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for i, rec in enumerate(pq.read_table(path).to_pylist()):
      yield i + 1, rec
  elif fmt == "json":
    with open(path, encoding="utf-8", errors="replace") as f:
      data = json.load(f, strict=False)
    if not isinstance(data, list):
      raise ValueError(
          f"{path}: a .json file must hold a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
      yield i + 1, rec
  else:
    with open(path, encoding="utf-8", errors="replace") as f:
      for i, line in enumerate(f):
        if not line.strip():
          continue
        try:
          # strict=False: some public copies (AIME 2024) hold raw control characters in strings.
          yield i + 1, json.loads(line, strict=False)
        except json.JSONDecodeError as e:
          skipped.append(Skipped(path, i + 1, f"not valid JSON ({e.msg} at column {e.colno})"))


def get_field(record: Any, dotted: str) -> Any:
  """`record["a"]["b"]` for `dotted="a.b"`; raises MalformedRow naming the missing part."""
  value = record
  for part in dotted.split("."):
    if not isinstance(value, dict) or part not in value:
      raise MalformedRow(f"missing field {dotted!r}")
    value = value[part]
  return value


def as_problem_text(value: Any, field: str) -> str:
  """The problem text of a field: a string, or the last user message of a chat list."""
  if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
    users = [m.get("content") for m in value if m.get("role", "user") == "user"]
    value = users[-1] if users else None
  if not isinstance(value, str) or not value.strip():
    raise MalformedRow(f"field {field!r} is empty or not text: {str(value)[:60]!r}")
  return value


_LEADING_ZEROS = re.compile(r"-?0+\d+")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def canonical_answer(value: Any, field: str = "answer", *, thousands: bool = False) -> str:
  """The reference answer as a string; integral numbers in canonical form.

  AMC answers are floats (27.0 -> "27"); AIME answers are zero-padded ("025" -> "25"), so both
  compare numerically with a model's "27" / "25". `thousands=True` also drops grouping commas
  ("1,234" -> "1234"), right for GSM8K but not for answers that may be tuples.
  """
  if isinstance(value, bool) or value is None:
    raise MalformedRow(f"field {field!r} has no answer: {value!r}")
  if isinstance(value, (int, float)):
    if isinstance(value, float) and not math.isfinite(value):
      raise MalformedRow(f"field {field!r} is not finite: {value!r}")
    if float(value).is_integer():
      return str(int(value))
    return repr(float(value))
  if not isinstance(value, str):
    raise MalformedRow(f"field {field!r} is not text or a number: {str(value)[:60]!r}")
  text = value.strip()
  if not text:
    raise MalformedRow(f"field {field!r} is empty")
  if thousands and _THOUSANDS.fullmatch(text):
    text = text.replace(",", "")
  if _LEADING_ZEROS.fullmatch(text):
    text = str(int(text))
  return text


Converter = Callable[[Any, int], Row]


def read_rows(path: str, convert: Converter) -> tuple[list[Row], list[Skipped]]:
  """All rows of `path` through `convert(record, line) -> Row`; malformed ones are skipped."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file not found: {path}")
  rows, skipped = [], []
  for line, record in _raw_records(path, skipped):
    try:
      if not isinstance(record, dict):
        raise MalformedRow(f"record is a {type(record).__name__}, not an object")
      rows.append(convert(record, line))
    except MalformedRow as e:
      skipped.append(Skipped(path, line, str(e)))
  skipped.sort(key=lambda s: s.line)
  return rows, skipped


def field_converter(prefix: str, problem_field: str, answer_field: str,
                    id_field: str | None = None, *, thousands: bool = False,
                    answer_after: str | None = None) -> Converter:
  """A converter reading configurable (dotted) fields; ids default to `{prefix}-{line}`.

  `answer_after="####"` takes the text after the last marker (GSM8K's worked answers).
  """

  def convert(record: Any, line: int) -> Row:
    problem = as_problem_text(get_field(record, problem_field), problem_field)
    answer = get_field(record, answer_field)
    if answer_after is not None:
      if not isinstance(answer, str) or answer_after not in answer:
        raise MalformedRow(f"field {answer_field!r} has no {answer_after!r} marker")
      answer = answer.rsplit(answer_after, 1)[1]
    answer = canonical_answer(answer, answer_field, thousands=thousands)
    rid = f"{prefix}-{line}"
    if id_field is not None:
      rid = str(get_field(record, id_field))
    return Row(rid, problem, answer, {})

  return convert
