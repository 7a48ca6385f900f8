"""Where explore_jax finds data and writes its own caches, how it reads the paths a user gives,
and how it writes a file whole.

Every path a user gives (CLI flag or config key) goes through one of two functions where it
enters, once:
- `absolute(path)`: a place to write or read (workdir, data dir, output): a local path is made
  absolute (so a later chdir, a subprocess or orbax sees the same place); a URL (gs://) is kept.
- `locate(path)`: where a model or tokenizer comes from, by one rule: an existing local path is a
  path (made absolute); `scheme://...` is a bucket; otherwise `ORG/NAME` or `ORG/NAME@REV` is a
  Hugging Face hub id; anything else is a local path (that does not exist, which the reader
  reports naming it).

The data directory is read-only: the benchmark files ship inside the package
(`explore_jax/data/files`, so a clone and a pip install both hold them); prepared datasets (TFDS array_record files), built tokenizers and
other derived files go to the project's cache directory instead.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The benchmark files that ship with the package (their provenance: README.md there).
PACKAGE_DATA_DIR = pathlib.Path(__file__).resolve().parent / "data" / "files"


def default_data_dir() -> str:
  """$EXPLORE_JAX_DATA, else the package's own data files (`PACKAGE_DATA_DIR`)."""
  if os.environ.get("EXPLORE_JAX_DATA"):
    return os.environ["EXPLORE_JAX_DATA"]
  return str(PACKAGE_DATA_DIR)


# ORG/NAME[@REV] as the hub spells ids: letters, digits, '-', '_', '.'; a revision is a branch,
# tag or commit (branches may hold '/').
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a model or tokenizer comes from (`locate`)."""
  kind: str  # "local" (an absolute path), "bucket" (a URL such as gs://...), "hub" (an id)
  path: str  # the absolute path, the URL, or the hub repo id ORG/NAME
  revision: str | None = None  # hub only: the @REV part (None: the default branch)


def absolute(path: str) -> str:
  """A local path made absolute (`~` expanded); a URL (`gs://...`) or "" unchanged."""
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def locate(path: str) -> Location:
  """The one rule for model and tokenizer paths (module docstring)."""
  if "://" in path:
    return Location("bucket", path)
  local = os.path.abspath(os.path.expanduser(path))
  m = _HUB_ID.match(path)
  if os.path.exists(local) or m is None or path.startswith((".", "~")):
    return Location("local", local)
  return Location("hub", m.group("repo"), m.group("rev"))


def write_whole(path, text: str) -> None:
  """Write `text` to `path` (local or a bucket, through etils.epath) whole or not at all: it goes
  to PATH.tmp first and is renamed into place, so readers never see half of it."""
  from etils import epath
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def cache_dir(*parts: str) -> str:
  """$EXPLORE_JAX_CACHE, else `~/.cache/explore_jax`; subdirectories are created on demand."""
  root = os.environ.get("EXPLORE_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "explore_jax")
  path = os.path.join(root, *parts)
  os.makedirs(path, exist_ok=True)
  return path
