"""A model's files on each host: the directory a model path names (`local_dir`: a local path, a
gs:// model staged to local disk, a hub id fetched into the hub cache), and a fingerprint that
hosts compare.

`stage_model("gs://BUCKET/Qwen2.5-7B", root)` copies the bucket directory to
`root/BUCKET/Qwen2.5-7B` once per host: into a temp dir beside it, renamed into place when every
file is there, with a record of what was copied (`STAGED_RECORD`: each file's size and the bucket's
version of it). A later call reuses the copy when the bucket still lists the same files, sizes and
versions and the copy still holds every file at its size; anything else (a file deleted, a new
upload of the model) is staged again. A copy cut short is never renamed into place, so never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

from explore_jax import paths
from explore_jax.config.cli import UserError

STAGED_RECORD = ".explore_jax_staged.json"  # hidden: outside the fingerprint and the model
# The first of these that the store reports is a file's version (gcsfs: the object's generation).
_VERSION_KEYS = ("generation", "md5Hash", "crc32c", "ETag", "mtime", "updated", "created")


class NotFound(UserError, FileNotFoundError):
  """A local model or tokenizer path that does not exist."""


def local_dir(path: str, what: str, stage_dir: str = "", kind: str = "model") -> str:
  """The directory on this host's disk that a model or tokenizer `path` names (`paths.locate`):
  a local path made absolute, a bucket directory staged under `stage_dir` (default: models/ in
  the cache dir), a hub id fetched into the hub cache (`hub.fetch`: `kind` "model",
  "tokenizer" or "config" says which files). `what` names the config key or flag in errors."""
  from explore_jax.models import hub

  location = paths.locate(path)
  if location.kind == "bucket":
    return stage_model(location.path, stage_dir or paths.cache_dir("models"), what)
  if location.kind == "hub":
    return hub.fetch(location, what, kind)
  if not os.path.exists(location.path):
    raise NotFound(f"{what}={path}: no such file or directory (nor a hub id ORG/NAME[@REV], nor "
                   "gs://...)")
  return location.path


def model_fingerprint(path: str, probe_bytes: int = 1 << 20) -> str:
  """A hash of a model directory's files: names, sizes and their first and last MiB (a retrained
  model differs everywhere; a copied or moved one does not differ at all). Cheap for a 7B. Hidden
  files and directories (a download's own records, e.g. .cache/huggingface) are left out."""
  root = os.path.realpath(path)
  digest = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      full = os.path.join(dirpath, name)
      if _hidden(os.path.relpath(full, root)):
        continue
      size = os.path.getsize(full)
      digest.update(f"{os.path.relpath(full, root)}\0{size}\0".encode())
      with open(full, "rb") as f:
        digest.update(f.read(probe_bytes))
        if size > probe_bytes:
          f.seek(max(size - probe_bytes, probe_bytes))
          digest.update(f.read())
  return digest.hexdigest()[:16]


def stage_model(url: str, root: str, what: str = "model") -> str:
  """The local copy under `root` of the bucket directory `url` (see the module docstring), made
  or reused; `what` names the config field in errors."""
  import fsspec

  fs, remote = fsspec.core.url_to_fs(url)
  remote = remote.rstrip("/")
  listing = _listing(fs, remote)
  if not listing:
    raise FileNotFoundError(f"{what}={url}: no files to stage (is it a directory in the bucket?)")
  dest = os.path.join(root, *_parts(url))
  if _is_copy_of(dest, url, listing):
    return dest
  logging.info("staging %s (%d files, %.2f GiB) to %s", url, len(listing),
               sum(size for size, _ in listing.values()) / 2**30, dest)
  t0 = time.perf_counter()
  parent = os.path.dirname(dest)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.partial-", dir=parent)
  try:
    _download(fs, [f"{remote}/{rel}" for rel in listing],
              [os.path.join(tmp, rel) for rel in listing])
    for rel, (size, _) in listing.items():
      got = os.path.getsize(os.path.join(tmp, rel))
      if got != size:
        raise OSError(f"{what}={url}: {rel} arrived with {got} bytes of {size}")
    with open(os.path.join(tmp, STAGED_RECORD), "w") as f:
      json.dump({"source": url, "files": listing}, f, indent=1)
    if _is_copy_of(dest, url, listing):  # another process of this host was quicker
      return dest
    if os.path.exists(dest):  # an incomplete or outdated copy: out of the way first
      stale = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.stale-", dir=parent)
      os.rename(dest, os.path.join(stale, "old"))
      shutil.rmtree(stale)
    try:
      os.rename(tmp, dest)
    except OSError:
      if not _is_copy_of(dest, url, listing):  # not another process of this host, done first
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("staged %s in %.0f s", url, time.perf_counter() - t0)
  return dest


def _download(fs, remote_paths: list[str], local_paths: list[str]) -> None:
  for path in local_paths:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  fs.get(remote_paths, local_paths)  # gcsfs fetches the files concurrently


def _listing(fs, remote: str) -> dict[str, list]:
  """{relative path: [size, version]} of the files under `remote`, hidden ones left out."""
  out = {}
  for path, info in sorted(fs.find(remote, detail=True).items()):
    rel = path.lstrip("/")[len(remote.lstrip("/")):].lstrip("/")
    if info.get("type") == "file" and rel and not _hidden(rel):
      version = next((info[k] for k in _VERSION_KEYS if info.get(k) is not None), None)
      out[rel] = [int(info["size"]), None if version is None else str(version)]
  return out


def _is_copy_of(dest: str, url: str, listing: dict) -> bool:
  """Whether `dest` is a complete copy of what the bucket lists now."""
  try:
    with open(os.path.join(dest, STAGED_RECORD)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  if record != {"source": url, "files": listing}:
    return False
  local = {}
  for dirpath, _, files in os.walk(dest):
    for name in files:
      rel = os.path.relpath(os.path.join(dirpath, name), dest)
      if not _hidden(rel):
        local[rel] = os.path.getsize(os.path.join(dest, rel))
  return local == {rel: size for rel, (size, _) in listing.items()}


def _parts(url: str) -> list[str]:
  """gs://BUCKET/a/b -> [BUCKET, a, b]: where under the staging root the copy goes."""
  parts = [p for p in url.split("://", 1)[1].split("/") if p]
  if not parts or any(p in (".", "..") for p in parts):
    raise ValueError(f"{url}: not a bucket directory (gs://BUCKET/PATH)")
  return parts


def _hidden(rel: str) -> bool:
  return any(part.startswith(".") for part in rel.replace(os.sep, "/").split("/"))
