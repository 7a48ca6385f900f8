"""The data that ships with the package: every file is the one its provenance record describes.

explore_jax/data/files/README.md holds a table of each file's record count, size and sha256; this
test reads that table and checks the files against it, so the record and the files cannot drift
apart, and a file added or removed without a row fails too.
"""

import hashlib
import os
import re

import pyarrow.parquet as pq

from explore_jax import paths

ROW = re.compile(r"^\| (\S+) \| (\d+) \| (\d+) \| ([0-9a-f]{64}) \|$")


def _table() -> dict[str, tuple[int, int, str]]:
  with open(paths.PACKAGE_DATA_DIR / "README.md") as f:
    rows = [ROW.match(line.strip()) for line in f]
  return {m[1]: (int(m[2]), int(m[3]), m[4]) for m in rows if m}


def _records(path: str) -> int:
  if path.endswith(".parquet"):
    return pq.read_metadata(path).num_rows
  with open(path, "rb") as f:
    return sum(1 for line in f if line.strip())


def test_every_file_matches_its_provenance_record():
  table = _table()
  assert len(table) == 7, table  # the seven files the data registry reads
  root = paths.PACKAGE_DATA_DIR
  shipped = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}
  assert shipped - {"README.md"} == set(table)
  for rel, (records, size, sha256) in table.items():
    full = os.path.join(root, rel)
    with open(full, "rb") as f:
      raw = f.read()
    assert (len(raw), hashlib.sha256(raw).hexdigest()) == (size, sha256), rel
    assert _records(full) == records, rel


def test_the_registry_reads_the_shipped_files(monkeypatch):
  # The default data folder is the package's (no $EXPLORE_JAX_DATA, nothing outside the package).
  monkeypatch.delenv("EXPLORE_JAX_DATA", raising=False)
  assert paths.default_data_dir() == str(paths.PACKAGE_DATA_DIR)
  assert paths.PACKAGE_DATA_DIR.is_relative_to(os.path.dirname(paths.__file__))
  from explore_jax.data import builders
  files = {f for cls in (builders.Math500, builders.Aime24, builders.Aime25, builders.Amc23,
                         builders.Gsm8k, builders.DapoMath17k) for f in cls.SPLIT_FILES.values()}
  assert files == set(_table())
