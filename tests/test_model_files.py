"""A gs:// model.path is staged to each worker's disk once, atomically, and the trainer checks that
every host reads the same model files."""

from __future__ import annotations

import os

import pytest
from etils import epath

from explore_jax.config import defaults
from explore_jax.models import files as model_files
from explore_jax.tpu import sharding
from explore_jax.train import setup

FILES = {"config.json": b'{"model_type": "qwen2"}', "model-00001-of-00002.safetensors": b"a" * 3000,
         "model-00002-of-00002.safetensors": b"b" * 1000, "sub/extra.txt": b"extra",
         "tokenizer.json": b"{}",  # resolve_model checks that a tokenizer is there
         ".cache/huggingface/download.lock": b"hidden: not copied"}


def _config(stage_dir, path="gs://bucket/models/Qwen-tiny", tokenizer=""):
  config = defaults.base_config()
  config.model.path = path
  config.model.tokenizer = tokenizer
  config.model.stage_dir = str(stage_dir)
  return config


def _tree(root) -> dict[str, bytes]:
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      full = os.path.join(dirpath, name)
      out[os.path.relpath(full, root)] = open(full, "rb").read()
  return out


def test_stage_reuse_redo_and_fingerprint_check(fake_bucket, tmp_path, monkeypatch):
  for name, data in FILES.items():
    (epath.Path("gs://bucket/models/Qwen-tiny") / name).write_bytes(data)
  epath.Path("gs://bucket/models/tok/tokenizer.json").write_bytes(b"{}")
  checks = []
  monkeypatch.setattr(sharding, "check_same_on_every_host", lambda *a: checks.append(a))
  stage = tmp_path / "stage"

  model_dir, tokenizer_dir = setup.resolve_model(_config(stage))
  assert model_dir == str(stage / "bucket" / "models" / "Qwen-tiny") == tokenizer_dir
  visible = {k: v for k, v in FILES.items() if not k.startswith(".")}
  assert {k: v for k, v in _tree(model_dir).items() if not k.startswith(".")} == visible
  assert not os.path.exists(os.path.join(model_dir, ".cache"))
  assert os.listdir(stage / "bucket" / "models") == ["Qwen-tiny"]  # no temp dir left beside
  fingerprint = model_files.model_fingerprint(model_dir)
  assert checks == [("train: the model files of gs://bucket/models/Qwen-tiny", fingerprint)]

  # Again: the complete copy is reused, nothing is copied.
  weights = os.path.join(model_dir, "model-00001-of-00002.safetensors")
  seen = os.stat(model_dir).st_ino, os.stat(weights).st_mtime_ns
  monkeypatch.setattr(model_files, "_download", lambda *a: pytest.fail("copied again"))
  assert setup.resolve_model(_config(stage))[0] == model_dir
  assert (os.stat(model_dir).st_ino, os.stat(weights).st_mtime_ns) == seen
  monkeypatch.undo()
  monkeypatch.setattr(sharding, "check_same_on_every_host", lambda *a: checks.append(a))

  # A partial copy (a file gone) is never used: staged again.
  os.remove(weights)
  assert setup.resolve_model(_config(stage))[0] == model_dir
  assert open(weights, "rb").read() == FILES["model-00001-of-00002.safetensors"]
  assert os.stat(model_dir).st_ino != seen[0]
  # So is a copy of an older upload of the same sizes (a retrained model in the same place).
  epath.Path("gs://bucket/models/Qwen-tiny/model-00002-of-00002.safetensors").write_bytes(
      b"c" * 1000)
  setup.resolve_model(_config(stage))
  assert _tree(model_dir)["model-00002-of-00002.safetensors"] == b"c" * 1000
  assert checks[-1][1] != fingerprint

  # A gs:// tokenizer is staged and checked as well.
  checks.clear()
  model_dir, tokenizer_dir = setup.resolve_model(
      _config(stage, tokenizer="gs://bucket/models/tok"))
  assert tokenizer_dir == str(stage / "bucket" / "models" / "tok")
  assert _tree(tokenizer_dir)["tokenizer.json"] == b"{}"
  assert [c[0] for c in checks] == ["train: the model files of gs://bucket/models/Qwen-tiny",
                                    "train: the tokenizer files of gs://bucket/models/tok"]

  with pytest.raises(FileNotFoundError, match="model.path=gs://bucket/nothing: no files"):
    setup.resolve_model(_config(stage, path="gs://bucket/nothing"))
