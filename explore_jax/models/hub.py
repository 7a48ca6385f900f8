"""Models, tokenizers and datasets by Hugging Face hub id (`ORG/NAME` or `ORG/NAME@REV`).

`paths.locate` decides what is an id; this module turns one into a directory on this host's disk
through `huggingface_hub.snapshot_download`, so everything a transformers user has set up holds
here too: the hub cache (`HF_HOME`, `HF_HUB_CACHE`), `HF_TOKEN` for gated or private repositories,
and `HF_HUB_OFFLINE=1` for a machine without network (then only the cache is read). A model
fetches only what explore_jax reads: safetensors weights, their index, config.json,
generation_config.json and the tokenizer's files (never pickled weights); the dry run and
`explore_jax.aot` fetch config.json alone. On a pod every host fetches its own copy, as with a
gs:// model, and the callers then check that all hosts read the same files
(`sharding.check_same_on_every_host` over `files.model_fingerprint`).

A repository that cannot be had (offline and not cached, no such id, gated without a token) is a
`Unavailable` error: one line naming the id, the cache it looked in and how to fetch it. The hub
client tries once; nothing here retries.
"""

from __future__ import annotations

import logging
import os
import re

from explore_jax import paths
from explore_jax.config.cli import UserError

_log = logging.getLogger(__name__)

TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                      "chat_template.jinja", "chat_template.json")
CONFIG_PATTERNS = ("config.json", "generation_config.json")
MODEL_PATTERNS = ("*.safetensors", "model.safetensors.index.json", *CONFIG_PATTERNS,
                  *TOKENIZER_PATTERNS)
DATA_PATTERNS = ("*.jsonl", "*.json", "*.parquet", "*.ndjson")
DATA_SUFFIXES = tuple(p[1:] for p in DATA_PATTERNS)  # ".jsonl", ...


class Unavailable(UserError, FileNotFoundError):
  """The hub repository cannot be had here (module docstring)."""


def cache_dir() -> str:
  """The hub cache huggingface_hub reads and writes ($HF_HUB_CACHE, else $HF_HOME/hub)."""
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def download(location: paths.Location, what: str, patterns=MODEL_PATTERNS,
             repo_type: str = "model") -> str:
  """The snapshot directory of `location` (a hub Location) holding the files that match
  `patterns`, fetched into the hub cache unless it is there; `what` names the config key or flag
  in errors."""
  from huggingface_hub import errors, snapshot_download

  spec = location.path + (f"@{location.revision}" if location.revision else "")
  try:
    path = snapshot_download(location.path, revision=location.revision, repo_type=repo_type,
                             allow_patterns=list(patterns))
  except errors.GatedRepoError:
    raise Unavailable(f"{what}={spec}: a gated repository; accept its terms on huggingface.co "
                      "and set HF_TOKEN (or run `hf auth login`)") from None
  except errors.RepositoryNotFoundError:
    raise Unavailable(f"{what}={spec}: no such {repo_type} repository on the hub (a private one "
                      "needs HF_TOKEN); a local directory must exist to be read as a path"
                      ) from None
  except errors.RevisionNotFoundError:
    raise Unavailable(f"{what}={spec}: the repository has no revision "
                      f"{location.revision!r}") from None
  except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError) as e:
    raise Unavailable(_not_cached(spec, location, what, repo_type, e)) from None
  _log.info("%s=%s: %s", what, spec, path)
  return path


def _not_cached(spec: str, location: paths.Location, what: str, repo_type: str, error) -> str:
  from huggingface_hub import constants
  why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
         f"the hub could not be reached ({type(error.__cause__ or error).__name__})")
  fetch = "hf download " + location.path
  if location.revision:
    fetch += f" --revision {location.revision}"
  if repo_type != "model":
    fetch += f" --repo-type {repo_type}"
  return (f"{what}={spec}: not in the hub cache {cache_dir()} and {why}; fetch it where the hub "
          f"can be reached (`{fetch}`, with the same HF_HOME) or give a local directory")


KINDS = {"model": MODEL_PATTERNS, "tokenizer": TOKENIZER_PATTERNS + CONFIG_PATTERNS,
         "config": CONFIG_PATTERNS}


def fetch(location: paths.Location, what: str, kind: str = "model") -> str:
  """The snapshot directory of a model ("model": weights, config and tokenizer), of its
  tokenizer alone ("tokenizer") or of its config alone ("config")."""
  path = download(location, what, KINDS[kind])
  names = set(os.listdir(path))
  if kind == "model" and not any(n.endswith(".safetensors") for n in names):
    raise Unavailable(f"{what}={location.path}: the repository has no safetensors weights "
                      "(explore_jax reads safetensors only, never pickled .bin files)")
  if kind == "config" and "config.json" not in names:
    raise Unavailable(f"{what}={location.path}: the repository has no config.json")
  return path


def dataset_file(location: paths.Location, split: str, what: str, file: str = "") -> str:
  """The local path of a hub dataset's data file: `file` (a path in the repository) when given,
  else the split's: the one JSONL / JSON / parquet file whose path names the split as a word
  (`test.jsonl`, `data/train-00000-of-00001.parquet`, `main/test.jsonl`), or the repository's only
  data file whatever its name. A split spread over several files, or none found, is an error that
  lists the files (then name one: hf:ORG/NAME:PATH)."""
  if file:
    root = download(location, what, (file,), repo_type="dataset")
    if not os.path.isfile(os.path.join(root, file)):
      raise Unavailable(f"{what}=hf:{location.path}:{file}: the repository has no such file")
    return os.path.join(root, file)
  root = download(location, what, DATA_PATTERNS, repo_type="dataset")
  files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                 for f in fs if f.endswith(DATA_SUFFIXES) and not f.startswith("."))
  word = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
  named = [f for f in files if word.search(f)]
  if len(named) == 1 or (not named and len(files) == 1):
    return os.path.join(root, (named or files)[0])
  raise Unavailable(f"{what}=hf:{location.path}: {'several' if named else 'no'} data files for "
                    f"split {split!r} among {files[:10]}; name one as hf:{location.path}:PATH")
