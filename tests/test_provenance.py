"""Each workdir records the commit and the package versions each start ran with; a resume with
others is named in a warning."""

import json
import logging
import subprocess

from explore_jax import paths, provenance


def test_records_each_start_and_names_what_changed(tmp_path, monkeypatch, caplog):
  assert provenance.note_start(str(tmp_path)) == []
  first = json.loads((tmp_path / provenance.FILE).read_text())
  assert len(first) == 1
  head = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "rev-parse", "HEAD"],
                        capture_output=True, text=True)
  if head.returncode == 0:  # a checkout (CI's clone is one); a shipped copy has no .git
    assert first[0]["commit"] == head.stdout.strip()
  import numpy
  assert first[0]["packages"]["numpy"] == numpy.__version__
  # The same code and versions again: nothing to say.
  assert provenance.note_start(str(tmp_path)) == []
  # Another numpy, a package gone and one added: each named, old -> new.
  real = provenance.installed_packages()
  fake = {**real, "numpy": "0.0.1", "brand-new": "1.0"}
  del fake["scipy"]
  monkeypatch.setattr(provenance, "installed_packages", lambda: fake)
  with caplog.at_level(logging.WARNING):
    changed = provenance.note_start(str(tmp_path))
  assert changed == ["brand-new (none) -> 1.0", f"numpy {numpy.__version__} -> 0.0.1",
                     f"scipy {real['scipy']} -> (none)"]
  assert "numpy" in caplog.text and "resuming with other code or versions" in caplog.text
  history = json.loads((tmp_path / provenance.FILE).read_text())
  assert len(history) == 3 and history[-1]["packages"]["numpy"] == "0.0.1"


def test_a_changed_commit_is_named(tmp_path):
  old = {"commit": "aaa", "dirty": False, "python": "3.11.2", "packages": {"jax": "0.1"}}
  new = {"commit": "bbb", "dirty": True, "python": "3.11.2", "packages": {"jax": "0.1"}}
  assert provenance.changes(old, new) == ["commit aaa -> bbb"]
  assert provenance.changes(old, {**old, "dirty": True}) == [
      "tracked files modified since the commit"]
