"""Reading local JSONL / JSON / parquet files into (id, problem, answer) rows.

Every dataset, the paper's benchmarks and a user's own file alike, goes through `read_rows`: it
yields one `Row` per usable record and collects one `Skipped` per malformed one (a line that is not
JSON, a record without a problem or an answer, an id seen before), each with its 1-based line
number (JSONL) or record number (JSON array, parquet), so that a bad row costs a warning, not the
whole file. A row kept with a change (invalid UTF-8 bytes read as U+FFFD) gets a note of the same
form. A file with no usable row is an error that says how many records were read and why each was
skipped; a UTF-16 or UTF-32 file is refused naming its encoding (the readers read UTF-8).

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


_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32-LE", b"\x00\x00\xfe\xff": "UTF-32-BE",
              b"\xff\xfe": "UTF-16-LE", b"\xfe\xff": "UTF-16-BE"}


def _check_encoding(path: str, head: bytes) -> None:
  """Refuse a UTF-16/32 text file (by its byte-order mark, or NUL bytes where UTF-8 text has
  none): read as UTF-8 it is a NUL between every character, and no record parses."""
  wide = next((name for bom, name in _WIDE_BOMS.items() if head.startswith(bom)), None)
  if wide is None and b"\x00" in head:
    wide = "UTF-16 or UTF-32 (NUL bytes in its text)"
  if wide:
    raise ValueError(f"{path}: encoded as {wide}; explore_jax reads UTF-8 text: save the file "
                     "as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)")


def _decode_line(raw: bytes, line: int, path: str, notes: list[Skipped]) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    notes.append(Skipped(path, line, f"invalid UTF-8 (byte {e.start} of the line, 0x"
                         f"{raw[e.start]:02x}) read as U+FFFD"))
    return raw.decode("utf-8", errors="replace")


def _raw_records(path: str, skipped: list[Skipped], notes: list[Skipped]
                 ) -> Iterator[tuple[int, Any]]:
  """(line number, decoded record) for every record; undecodable lines go to `skipped`, lines
  with invalid UTF-8 (kept, read as U+FFFD) to `notes`."""
  fmt = file_format(path)
  if fmt == "parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for i, rec in enumerate(pq.read_table(path).to_pylist()):
      yield i + 1, rec
    return
  with open(path, "rb") as f:
    raw = f.read()
  _check_encoding(path, raw[:4096])
  raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # a UTF-8 byte-order mark
  lines = [_decode_line(b, i + 1, path, notes) for i, b in enumerate(raw.split(b"\n"))]
  if fmt == "json":
    try:
      data = json.loads("\n".join(lines), strict=False)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
      raise ValueError(
          f"{path}: a .json file must hold a list of records, got {type(data).__name__}")
    yield from ((i + 1, rec) for i, rec in enumerate(data))
    return
  for i, line in enumerate(lines):
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


def read_rows(path: str, convert: Converter, notes: list[Skipped] | None = None
              ) -> tuple[list[Row], list[Skipped]]:
  """All rows of `path` through `convert(record, line) -> Row`; malformed ones and repeated ids
  are skipped (a result is keyed by its id). Rows kept with a change are noted in `notes`. A
  file with no usable row is a ValueError listing why each record was skipped."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file not found: {path}")
  rows, skipped, first = [], [], {}
  notes = [] if notes is None else notes
  read = 0
  for line, record in _raw_records(path, skipped, notes):
    read += 1
    try:
      if not isinstance(record, dict):
        raise MalformedRow(f"record is a {type(record).__name__}, not an object")
      row = convert(record, line)
      if row.id in first:
        raise MalformedRow(f"duplicate id {row.id!r} (first at line {first[row.id]}); ids key "
                           "the results, so each must be unique")
      first[row.id] = line
      rows.append(row)
    except MalformedRow as e:
      skipped.append(Skipped(path, line, str(e)))
  skipped.sort(key=lambda s: s.line)
  if not rows:
    raise ValueError(no_rows_message(path, read + sum(
        s.reason.startswith("not valid JSON") for s in skipped), skipped))
  return rows, skipped


def no_rows_message(path: str, records: int, skipped: list[Skipped], limit: int = 10) -> str:
  if not records:
    return f"{path}: no records (the file is empty or blank)"
  why = "\n  ".join(str(s) for s in skipped[:limit])
  more = f"\n  ... and {len(skipped) - limit} more" if len(skipped) > limit else ""
  return (f"{path}: no usable rows: {records} record{'s' if records > 1 else ''} read, "
          f"{len(skipped)} skipped:\n  {why}{more}")


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
