"""What a run started with: the git commit of the code and the installed package versions.

Every workdir of the trainer, the evaluator and the demo holds `environment.json`, a list with one
record per start (the first is the run's own start, later ones its resumes). A resume whose
commit or versions differ from the last start's is allowed (a fix may be why it was restarted)
but logged as a warning naming what changed, since XLA and the libraries can change numbers.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import platform
import subprocess
import sys

from etils import epath

from explore_jax import paths

FILE = "environment.json"
COMMIT_FILE = ".launch_commit"  # launch_tpu.sh setup writes it beside code shipped without .git


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", "-C", str(paths.REPO_ROOT), *args], capture_output=True,
                         text=True, timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
  """{"commit": sha or None, "dirty": whether tracked files differ from it (None: unknown)}."""
  commit = _git("rev-parse", "HEAD")
  if commit is None:
    shipped = paths.REPO_ROOT / COMMIT_FILE
    return {"commit": shipped.read_text().strip() if shipped.exists() else None, "dirty": None}
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": None if status is None else bool(status)}


def installed_packages() -> dict[str, str]:
  """Every distribution importable from this interpreter, name (lower case) -> version."""
  found = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"]
    if name:
      found.setdefault(name.lower(), dist.version)
  return dict(sorted(found.items()))


def record() -> dict:
  return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          **code_version(), "python": sys.version.split()[0], "machine": platform.machine(),
          "packages": installed_packages()}


def changes(old: dict, new: dict) -> list[str]:
  """What differs between two records, one phrase each (empty: the same code and versions)."""
  out = []
  if old.get("commit") != new.get("commit"):
    out.append(f"commit {old.get('commit')} -> {new.get('commit')}")
  elif new.get("dirty") and not old.get("dirty"):
    out.append("tracked files modified since the commit")
  if old.get("python") != new.get("python"):
    out.append(f"python {old.get('python')} -> {new.get('python')}")
  a, b = old.get("packages", {}), new.get("packages", {})
  for name in sorted(set(a) | set(b)):
    if a.get(name) != b.get(name):
      out.append(f"{name} {a.get(name, '(none)')} -> {b.get(name, '(none)')}")
  return out


def note_start(workdir: str) -> list[str]:
  """Append this start's record to WORKDIR/environment.json; return (and log as a warning) how it
  differs from the previous start's. Call on one process (the file is whole-written)."""
  path = epath.Path(workdir) / FILE
  history = []
  if path.exists():
    try:
      history = json.loads(path.read_text())
    except json.JSONDecodeError:
      logging.warning("%s: not valid JSON; starting a new record", path)
    if not isinstance(history, list):
      history = []
  now = record()
  changed = changes(history[-1], now) if history else []
  if changed:
    logging.warning("%s: resuming with other code or versions than the last start (%s): %s. "
                    "Results may not match an uninterrupted run to the last bit.", workdir,
                    history[-1].get("started"), "; ".join(changed))
  history.append(now)
  paths.write_whole(path, json.dumps(history, indent=1) + "\n")
  return changed
