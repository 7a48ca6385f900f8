"""Datasets with checkable answers: `load(name, split)` -> records with `id`, `problem`, `answer`.

Names and splits (the files ship in explore_jax/data/files; their provenance: README.md there):
  dapo_math_17k  train 17,917   DAPO-Math-17k (parquet; answer = reward_model.ground_truth)
  math500        test 500       MATH-500
  aime24         test 30        AIME 2024 (answers "025" stored as "25": compare numerically)
  aime25         test 30        AIME 2025
  amc23          test 40        AMC 2023 (float answers 27.0 stored as "27")
  gsm8k          train 7,473 / test 1,319   (answer = the text after "####")
  synthetic_arithmetic  train / test        generated in memory, see `synthetic`
  countdown      train / test               generated in memory, see `countdown`
A user's own JSONL / JSON / parquet file: `load_file(path, problem_field=..., answer_field=...)`,
or `load(PATH, ...)` with the same field names. A dataset on the Hugging Face hub:
`load("hf:ORG/NAME", split, problem_field=..., answer_field=...)` (also `hf:ORG/NAME@REV` and
`hf:ORG/NAME:PATH/IN/REPO.parquet`): its data file for the split is fetched into the hub cache
(`explore_jax.models.hub.dataset_file`) and read as a user's file.

Files are prepared once into TFDS array_record files under the project cache (see `builders`);
records come back as a lazy `Records` sequence that decodes one record per index, which is what
a grain `MapDataset.source` wants.
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import logging
import os
from typing import Any

import numpy as np

from explore_jax import paths
from explore_jax.data import builders, countdown, readers, synthetic

_log = logging.getLogger(__name__)

_BUILDERS: dict[str, type[builders.LocalFileBuilder]] = {
    "dapo_math_17k": builders.DapoMath17k,
    "math500": builders.Math500,
    "aime24": builders.Aime24,
    "aime25": builders.Aime25,
    "amc23": builders.Amc23,
    "gsm8k": builders.Gsm8k,
}
NAMES = tuple(_BUILDERS) + ("synthetic_arithmetic", "countdown")


def _decode(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.generic):
    return value.item()
  return value


class Records(Sequence):
  """Read-only sequence of record dicts over a TFDS data source, decoded on access.

  `skipped` lists the malformed source rows (file, line, reason) left out of the dataset;
  `notes` the rows kept with a change (invalid UTF-8 read as U+FFFD).
  """

  def __init__(self, source: Sequence[dict[str, Any]], skipped=(), notes=()):
    self._source = source
    self.skipped: list[readers.Skipped] = list(skipped)
    self.notes: list[readers.Skipped] = list(notes)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.__getitems__(list(range(*index.indices(len(self)))))
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"record index {index} out of range for {len(self)} records")
    return {k: _decode(v) for k, v in self._source[index].items()}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # One batched read of the array_record files instead of one read per record.
    rows = self._source.__getitems__(list(indices)) if indices else []
    return [{k: _decode(v) for k, v in row.items()} for row in rows]

  def __iter__(self):
    for start in range(0, len(self), 1024):
      yield from self.__getitems__(range(start, min(start + 1024, len(self))))


def _warn_skipped(what: str, builder: builders.LocalFileBuilder, limit: int = 20) -> None:
  for kind, items in (("skipped malformed row", builder.skipped),
                      ("kept a changed row", builder.notes)):
    for s in items[:limit]:
      _log.warning("%s: %s %s", what, kind, s)
    if len(items) > limit:
      _log.warning("%s: ... and %d more", what, len(items) - limit)
  if builder.skipped:
    _log.warning("%s: %d malformed rows skipped in all", what, len(builder.skipped))


HUB_PREFIX = "hf:"


def load(name: str, split: str, data_dir: str | None = None, *,
         synthetic_config: synthetic.ArithmeticConfig | None = None,
         countdown_config: countdown.CountdownConfig | None = None,
         problem_field: str = "problem", answer_field: str = "answer", id_field: str = ""
         ) -> Sequence[dict[str, Any]]:
  """Records of dataset `name` (see the module docstring) for `split`.

  `data_dir` is the folder holding the source files; default `paths.default_data_dir()`
  ($EXPLORE_JAX_DATA, else the files that ship in the package). `synthetic_config` and
  `countdown_config` set the generated tasks' difficulty (default: their configs' defaults).
  The field names (dotted paths) are those of a user's file or hub dataset.
  """
  fields = dict(problem_field=problem_field, answer_field=answer_field, id_field=id_field or None)
  if name.startswith(HUB_PREFIX):
    return load_file(hub_file(name, split), **fields)
  if name.lower().endswith((".jsonl", ".ndjson", ".json", ".parquet")):
    return load_file(name, **fields)
  if name == "synthetic_arithmetic":
    return synthetic.load_split(split, synthetic_config or synthetic.ArithmeticConfig())
  if name == "countdown":
    return countdown.load_split(split, countdown_config or countdown.CountdownConfig())
  if name not in _BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)} (or use load_file)")
  cls = _BUILDERS[name]
  if split not in cls.SPLIT_FILES:
    raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(cls.SPLIT_FILES)}")
  builder = builders.prepare(cls, data_dir or paths.default_data_dir())
  _warn_skipped(name, builder)
  return Records(builder.as_data_source(split), builder.skipped, builder.notes)


def hub_file(name: str, split: str) -> str:
  """The local copy of the data file that "hf:ORG/NAME[@REV][:PATH]" names for `split`."""
  from explore_jax.config.cli import BadValue
  from explore_jax.models import hub
  spec, _, file = name[len(HUB_PREFIX):].partition(":")
  location = paths.locate(spec)
  if location.kind != "hub":
    raise BadValue(f"dataset {name!r}: expected hf:ORG/NAME[@REV][:PATH]")
  return hub.dataset_file(location, split, "dataset", file)


def file_fields(section) -> dict:
  """`load`'s field-name arguments from a config section with problem_field, answer_field and
  id_field (the trainer's `data`, an evaluator benchmark)."""
  return {"problem_field": section.problem_field, "answer_field": section.answer_field,
          "id_field": section.id_field}


def generated_task_configs(synthetic_fields, countdown_fields) -> dict:
  """`load`'s keyword arguments for the generated tasks, from their config sections (the
  trainer's `data.synthetic` / `data.countdown`, the evaluator's `synthetic` / `countdown`)."""
  return {"synthetic_config": synthetic.ArithmeticConfig(**synthetic_fields),
          "countdown_config": countdown.CountdownConfig(**countdown_fields)}


def load_file(path: str, *, problem_field: str = "problem", answer_field: str = "answer",
              id_field: str | None = None) -> Records:
  """Records of a user's JSONL / JSON-array / parquet file (fields may be dotted paths).

  Malformed rows (bad JSON, missing or empty problem/answer, a repeated id) are skipped, logged
  as warnings with their line numbers, and listed in `.skipped`; rows kept with a change
  (invalid UTF-8) likewise in `.notes`. A file with no usable row is a ValueError that lists why
  each record was skipped. Records also carry `line`, their source line.
  """
  path = os.path.abspath(path)
  readers.file_format(path)  # fail early on an unknown extension
  # One config per (file, fields): its name keys the TFDS directory layout.
  key = hashlib.sha256(repr((path, problem_field, answer_field, id_field)).encode()).hexdigest()
  config = builders.UserFileConfig(name=f"f{key[:12]}", path=path, problem_field=problem_field,
                                   answer_field=answer_field, id_field=id_field)
  builder = builders.prepare(builders.UserFile, os.path.dirname(path), config)
  _warn_skipped(path, builder)
  return Records(builder.as_data_source(config.split), builder.skipped, builder.notes)
