"""What every command line of explore_jax shares: quiet third-party logs and one-line user errors.

A run's own lines (explore_jax's logging at INFO, its prints) are what a researcher reads; by
default the libraries underneath (absl, TFDS, orbax, JAX's backend probing, huggingface_hub,
transformers) speak only at WARNING and above. `--verbose` (every CLI has it) brings their INFO
back.
While the trainer's progress bar is drawn, log lines go through `tqdm.write` (`progress_bar`), so
that a line never lands in the middle of the bar.

`UserError` marks a problem with what the user gave (a hub id not in the cache, a mesh that does
not divide the devices) that one line explains: the CLIs print `error: MESSAGE` and exit 1 without
a traceback. Every other exception keeps its traceback: it is a bug to report, not an input to fix.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

# Loggers that speak at INFO about their own bookkeeping (orbax's CheckpointManagerOptions, TFDS's
# "Dataset ... prepared", JAX's "Unable to initialize backend 'tpu'").
_THIRD_PARTY = ("absl", "jax", "jax._src", "orbax", "tensorflow_datasets", "huggingface_hub",
                "transformers", "etils", "grain", "httpx", "urllib3", "fsspec", "gcsfs")


class UserError(Exception):
  """A problem with the user's input that one line explains (module docstring)."""


class BadValue(UserError, ValueError):
  """A config key or flag whose value cannot work; the message names the key."""


def quiet_logs(verbose: bool = False) -> None:
  """explore_jax's own logs at INFO (it logs through the root logger); the named third-party
  loggers at WARNING unless `verbose`."""
  logging.getLogger().setLevel(logging.INFO)
  level = logging.INFO if verbose else logging.WARNING
  for name in _THIRD_PARTY:
    logging.getLogger(name).setLevel(level)
  # C++ logs of XLA and TensorFlow's loaders ("Unable to initialize backend", plugin notices).
  # (Not absl.logging.set_verbosity: under absl.app it sets the root logger's level, which would
  # silence explore_jax's own lines too; orbax and TFDS log through the "absl" logger above.)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")


def run_main(fn: Callable[[], object]) -> object:
  """fn(), with a UserError turned into `error: MESSAGE` on stderr and exit status 1."""
  try:
    return fn()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def progress_bar(**kwargs):
  """A tqdm bar (kwargs: tqdm's) under which every log line is written whole: while it is open,
  the root logger's handlers are replaced by one that formats a record with the first of them
  and hands the line to `tqdm.write` (which clears the bar, writes, redraws); `close()` puts the
  handlers back."""
  import tqdm

  root = logging.getLogger()
  saved = list(root.handlers)

  class _Write(logging.Handler):
    def emit(self, record):
      formatter = saved[0] if saved else logging.Handler()
      try:
        tqdm.tqdm.write(formatter.format(record), file=sys.stderr)
      except Exception:  # pylint: disable=broad-except  (as logging.Handler.emit does)
        self.handleError(record)

  class _Bar(tqdm.tqdm):
    def close(self):
      if root.handlers == [handler]:
        root.handlers[:] = saved
      super().close()

  bar = _Bar(**kwargs)
  handler = _Write(level=min((h.level for h in saved), default=logging.NOTSET))
  root.handlers[:] = [handler]
  return bar
