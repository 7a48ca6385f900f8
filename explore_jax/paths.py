"""Where explore_jax finds shared data and writes its own caches, and how it writes a file whole.

`../shared` is read-only: prepared datasets (TFDS array_record files), built tokenizers and other
derived files go to the project's cache directory instead.
"""

from __future__ import annotations

import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
  """$EXPLORE_JAX_DATA, else `../shared/data` next to this checkout."""
  if os.environ.get("EXPLORE_JAX_DATA"):
    return os.environ["EXPLORE_JAX_DATA"]
  return str(REPO_ROOT.parent / "shared" / "data")


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
