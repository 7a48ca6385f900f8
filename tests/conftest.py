"""Shared fixtures: tiny random Hugging Face Qwen2 models and their explore_jax parameters.

`make_tiny_hf(**overrides)` builds a `transformers.Qwen2ForCausalLM` with random weights (biases and
norm weights randomised too, since they initialise to 0 / 1 and would hide layout bugs) and converts
it with the checkpoint rename table. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False, max_position_embeddings=128, bos_token_id=1,
            eos_token_id=2, initializer_range=0.1)  # 0.1: logits of O(1), so errors show


@dataclasses.dataclass
class TinyHF:
  hf: Any  # transformers.Qwen2ForCausalLM in eval mode, float32
  config: Any  # explore_jax Qwen2Config
  params: dict  # explore_jax params (float32 jax arrays)

  def hf_logits(self, tokens: np.ndarray) -> np.ndarray:
    """Reference logits [B, T, V] float32 from transformers, no padding."""
    import torch
    with torch.no_grad():
      return self.hf(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def make_tiny_hf(seed: int = 0, **overrides) -> TinyHF:
  """A random tiny HF Qwen2 (overrides: transformers.Qwen2Config fields) and explore_jax params."""
  import jax
  import torch
  import transformers

  from explore_jax.models import checkpoint

  kw = {**TINY, **overrides}
  torch.manual_seed(seed)
  hf_cfg = transformers.Qwen2Config(**kw, attn_implementation="eager")
  hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.5)
      elif "norm" in name:
        p.uniform_(0.5, 1.5)
  config, params = checkpoint.from_hf_model(hf)
  return TinyHF(hf, config, jax.tree.map(jax.numpy.asarray, params))


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable within each kind): with `-n 2` the two workers then end together
  instead of one of them starting a three-minute test while the other has nothing left."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_hf_model() -> TinyHF:
  """Untied, 4 query heads over 2 kv heads, 2 layers, width 64."""
  return make_tiny_hf()


@pytest.fixture
def fake_bucket():
  """gs:// paths served from memory, for code that writes a bucket through etils.epath (fsspec's
  "gcs" filesystem, which gcsfs provides for real). Yields the store: '/bucket/path' -> file.
  Orbax checkpoints do not go through fsspec (tensorstore), so they cannot use it."""
  import fsspec
  from etils.epath import backend
  from fsspec.implementations.memory import MemoryFileSystem
  from fsspec.registry import _registry

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix):]
      return super()._strip_protocol(path)

  saved = {name: _registry.get(name) for name in ("gs", "gcs")}
  for name in saved:
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  # epath caches one filesystem per protocol; drop it so that this one is used, and after.
  backend._FileSystemSpecBackend._get_filesystem.cache_clear()
  try:
    yield FakeGCS.store
  finally:
    for name, cls in saved.items():
      _registry.pop(name, None)
      if cls is not None:
        _registry[name] = cls
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def fill_hub_cache(hf_home, repo_id: str, source_dir, *, repo_type: str = "model",
                   revision: str = "main", commit: str | None = None) -> str:
  """Lay out the files under `source_dir` as huggingface_hub writes a download:
  HF_HOME/hub/{models|datasets}--ORG--NAME/blobs/SHA, snapshots/COMMIT/PATH -> ../../blobs/SHA
  (symlinks), refs/REVISION = COMMIT. Returns the snapshot directory. Nothing is downloaded."""
  import hashlib
  import os

  kind = {"model": "models", "dataset": "datasets"}[repo_type]
  repo = os.path.join(str(hf_home), "hub", f"{kind}--{repo_id.replace('/', '--')}")
  commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
  snapshot = os.path.join(repo, "snapshots", commit)
  for dirpath, _, names in os.walk(str(source_dir)):
    for name in names:
      rel = os.path.relpath(os.path.join(dirpath, name), str(source_dir))
      with open(os.path.join(dirpath, name), "rb") as f:
        raw = f.read()
      blob = os.path.join(repo, "blobs", hashlib.sha256(raw).hexdigest())
      os.makedirs(os.path.dirname(blob), exist_ok=True)
      with open(blob, "wb") as f:
        f.write(raw)
      link = os.path.join(snapshot, rel)
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  os.makedirs(os.path.join(repo, "refs", os.path.dirname(revision)), exist_ok=True)
  with open(os.path.join(repo, "refs", revision), "w") as f:
    f.write(commit)
  return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An empty hub cache at tmp_path/hf (HF_HOME), with HF_HUB_OFFLINE=1 in the environment (for
  subprocesses) and in huggingface_hub's constants (read at import, so patched for this
  process). Yields HF_HOME; fill it with `fill_hub_cache`."""
  from huggingface_hub import constants

  home = tmp_path / "hf"
  home.mkdir()
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setattr(constants, "HF_HOME", str(home))
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  yield home
