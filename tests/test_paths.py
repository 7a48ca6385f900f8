"""The one rule for the paths a user gives (explore_jax/paths.py)."""

import os

from explore_jax import paths


def test_absolute_makes_local_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute("runs/x") == str(tmp_path / "runs" / "x")
  assert paths.absolute("~/y") == os.path.join(os.path.expanduser("~"), "y")
  assert paths.absolute("gs://bucket/run") == "gs://bucket/run"
  assert paths.absolute("") == ""


def test_locate_tells_local_paths_buckets_and_hub_ids(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "Qwen" / "Qwen2.5-7B").mkdir(parents=True)
  # An existing folder wins over the hub id it looks like.
  assert paths.locate("Qwen/Qwen2.5-7B") == paths.Location(
      "local", str(tmp_path / "Qwen" / "Qwen2.5-7B"))
  assert paths.locate("Qwen/Qwen2.5-0.5B") == paths.Location("hub", "Qwen/Qwen2.5-0.5B")
  assert paths.locate("Qwen/Qwen2.5-0.5B@refs/pr/3") == paths.Location(
      "hub", "Qwen/Qwen2.5-0.5B", "refs/pr/3")
  assert paths.locate("org/name@0123abcd") == paths.Location("hub", "org/name", "0123abcd")
  assert paths.locate("gs://b/Qwen2.5-7B") == paths.Location("bucket", "gs://b/Qwen2.5-7B")
  # Not an id: more than one slash, a leading ./ or ~, or a bare name.
  for p in ("a/b/c", "./a/b", "model", "~/a"):
    loc = paths.locate(p)
    assert loc.kind == "local" and os.path.isabs(loc.path), (p, loc)
