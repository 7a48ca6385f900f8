"""TFDS builders over local files: one schema (`id`, `problem`, `answer` + source extras).

Each builder reads one local file per split through `readers.read_rows` and writes array_record
files, read back with `builder.as_data_source(split)`; nothing here needs TensorFlow (TFDS's
array_record path serialises with its own numpy example codec).

Where prepared data lives: `paths.cache_dir("tfds", <builder>, <fingerprint>)`, never next to the
source. The fingerprint hashes the builder version, its configuration and the bytes of its source
files, so an edited source file is rebuilt instead of served stale, and a second load of an
unchanged file only opens the prepared files. Builds take a file lock, so that two processes (test
workers, hosts sharing a disk) never prepare the same directory at once.

Builders are not entered in TFDS's global registry (`skip_registration`): their names are short
(`gsm8k`, `math500`) and must not collide with or leak into the TFDS catalogue.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from explore_jax import paths
from explore_jax.data import readers

_SKIPPED_FILE = "skipped_rows.json"


class LocalFileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: subclasses set SPLIT_FILES, EXTRA_FEATURES and implement `convert`."""

  VERSION = tfds.core.Version("1.0.0")
  SPLIT_FILES: dict[str, str] = {}  # split -> path relative to the source directory
  EXTRA_FEATURES: dict[str, Any] = {}  # feature name -> tfds feature (source fields kept)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks beside a builder's code for download checksums; these builders download
    # nothing, and the lookup needs `importlib_resources`, which is not a dependency.
    return None

  def __init__(self, *, source_dir: str, **kwargs):
    self.source_dir = source_dir
    self.skipped: list[readers.Skipped] = []
    self.notes: list[readers.Skipped] = []  # rows kept with a change (invalid UTF-8)
    super().__init__(file_format="array_record", **kwargs)

  def source_files(self) -> dict[str, str]:
    return {split: os.path.join(self.source_dir, rel) for split, rel in self.SPLIT_FILES.items()}

  def convert(self, record: Any, line: int, split: str) -> readers.Row:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"id": tfds.features.Text(), "problem": tfds.features.Text(),
                "answer": tfds.features.Text(), **self.EXTRA_FEATURES}
    # disable_shuffling keeps the source order (record i = row i), which error reports and
    # evaluation tables rely on; the training pipeline shuffles with its own seed anyway.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    return {split: self._generate_examples(split, path)
            for split, path in self.source_files().items()}

  def _generate_examples(self, split: str, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    rows, skipped = readers.read_rows(path, lambda rec, line: self.convert(rec, line, split),
                                      self.notes)
    self.skipped.extend(skipped)
    for i, row in enumerate(rows):
      yield i, {"id": row.id, "problem": row.problem, "answer": row.answer, **row.extra}


def _text(record: Any, field: str) -> str:
  value = record.get(field)
  return "" if value is None else str(value)


class Math500(LocalFileBuilder, skip_registration=True):
  SPLIT_FILES = {"test": "math500/test.jsonl"}
  EXTRA_FEATURES = {"solution": tfds.features.Text(), "subject": tfds.features.Text(),
                    "level": np.int32}

  def convert(self, record, line, split):
    row = readers.field_converter("math500", "problem", "answer", "unique_id")(record, line)
    extra = {"solution": _text(record, "solution"), "subject": _text(record, "subject"),
             "level": int(record.get("level") or 0)}
    return dataclasses.replace(row, extra=extra)


class Aime24(LocalFileBuilder, skip_registration=True):
  SPLIT_FILES = {"test": "aime24/test.jsonl"}
  EXTRA_FEATURES = {"url": tfds.features.Text()}

  def convert(self, record, line, split):
    row = readers.field_converter("aime24", "problem", "answer")(record, line)
    rid = f"aime24-{record['id']}" if "id" in record else row.id
    return dataclasses.replace(row, id=rid, extra={"url": _text(record, "url")})


class Aime25(LocalFileBuilder, skip_registration=True):
  SPLIT_FILES = {"test": "aime25/test.jsonl"}

  def convert(self, record, line, split):
    return readers.field_converter("aime25", "question", "answer")(record, line)


class Amc23(LocalFileBuilder, skip_registration=True):
  SPLIT_FILES = {"test": "amc23/test.jsonl"}
  EXTRA_FEATURES = {"url": tfds.features.Text()}

  def convert(self, record, line, split):
    row = readers.field_converter("amc23", "problem", "answer")(record, line)
    rid = f"amc23-{record['id']}" if "id" in record else row.id
    return dataclasses.replace(row, id=rid, extra={"url": _text(record, "url")})


class Gsm8k(LocalFileBuilder, skip_registration=True):
  SPLIT_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
  EXTRA_FEATURES = {"solution": tfds.features.Text()}  # the worked answer, before "####"

  def convert(self, record, line, split):
    row = readers.field_converter(f"gsm8k-{split}", "question", "answer", thousands=True,
                                  answer_after="####")(record, line)
    solution = _text(record, "answer").rsplit("####", 1)[0].rstrip()
    return dataclasses.replace(row, extra={"solution": solution})


class DapoMath17k(LocalFileBuilder, skip_registration=True):
  SPLIT_FILES = {"train": "dapo_math_17k/train.parquet"}
  EXTRA_FEATURES = {"data_source": tfds.features.Text()}

  def convert(self, record, line, split):
    row = readers.field_converter("dapo", "prompt", "reward_model.ground_truth")(record, line)
    index = (record.get("extra_info") or {}).get("index")
    rid = f"dapo-{index}" if index is not None else row.id
    return dataclasses.replace(row, id=rid, extra={"data_source": _text(record, "data_source")})


@dataclasses.dataclass(eq=False)
class UserFileConfig(tfds.core.BuilderConfig):
  """A user's JSONL / JSON / parquet file with configurable (dotted) field names."""

  path: str = ""
  problem_field: str = "problem"
  answer_field: str = "answer"
  id_field: str | None = None
  split: str = "train"


class UserFile(LocalFileBuilder, skip_registration=True):
  """Generic builder; its BuilderConfig carries the file and the field names."""

  BUILDER_CONFIGS = [UserFileConfig(name="default")]
  EXTRA_FEATURES = {"line": np.int32}  # line / record number in the source, for error reports

  def source_files(self):
    return {self.builder_config.split: self.builder_config.path}

  def convert(self, record, line, split):
    cfg = self.builder_config
    prefix = os.path.splitext(os.path.basename(cfg.path))[0]
    row = readers.field_converter(prefix, cfg.problem_field, cfg.answer_field,
                                  cfg.id_field)(record, line)
    return dataclasses.replace(row, extra={"line": line})


# --------------------------------------------------------------------------------------------------
# Build once, then read
# --------------------------------------------------------------------------------------------------


def _fingerprint(builder: LocalFileBuilder) -> str:
  h = hashlib.sha256()
  h.update(f"{type(builder).__name__}|{builder.VERSION}".encode())
  cfg = builder.builder_config
  if isinstance(cfg, UserFileConfig):
    # The config's name too: TFDS writes under it, and `load_file` names a config after its
    # file's path, so the same bytes at another path are another build (not a build without
    # this config's split).
    h.update(repr((cfg.name, cfg.problem_field, cfg.answer_field, cfg.id_field,
                   cfg.split)).encode())
  for split, path in sorted(builder.source_files().items()):
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{builder.name}: source file for split {split!r} not found: {path} (set data_dir or "
          "$EXPLORE_JAX_DATA to the folder that holds it)")
    h.update(split.encode())
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()[:16]


def prepare(builder_cls: type[LocalFileBuilder], source_dir: str,
            config: tfds.core.BuilderConfig | None = None) -> LocalFileBuilder:
  """A builder whose array_record files exist in the cache (built on first use)."""
  probe = builder_cls(source_dir=source_dir, config=config, data_dir=paths.cache_dir("tfds"))
  data_dir = paths.cache_dir("tfds", probe.name, _fingerprint(probe))
  builder = builder_cls(source_dir=source_dir, config=config, data_dir=data_dir)
  skipped_path = os.path.join(data_dir, _SKIPPED_FILE)
  if not os.path.exists(skipped_path):
    with open(os.path.join(data_dir, ".lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      if not os.path.exists(skipped_path):
        builder = builder_cls(source_dir=source_dir, config=config, data_dir=data_dir)
        tfds.display_progress_bar(False)
        builder.download_and_prepare()
        # Written last: its presence marks a complete build.
        paths.write_whole(skipped_path, json.dumps({k: [dataclasses.asdict(s) for s in
                                                        getattr(builder, k)]
                                                    for k in ("skipped", "notes")}))
      builder = builder_cls(source_dir=source_dir, config=config, data_dir=data_dir)
  with open(skipped_path) as f:
    recorded = json.load(f)
  if isinstance(recorded, list):  # a build from before notes were kept
    recorded = {"skipped": recorded}
  builder.skipped = [readers.Skipped(**s) for s in recorded["skipped"]]
  builder.notes = [readers.Skipped(**s) for s in recorded.get("notes", [])]
  return builder
