"""The cached tiny base model is published complete or not at all, however many processes build
it at once and whatever an older release left in the cache."""

import os

import pytest

from explore_jax.config import defaults
from explore_jax.demo import pretrain


@pytest.fixture
def config():
  c = defaults.tiny_config("test")
  c.pretrain.steps = 0  # a random model: the cache logic, not the training, is under test
  return c


def _published(root):
  return [d for d in os.listdir(root) if ".tmp-" not in d and ".incomplete-" not in d]


def test_publishes_a_complete_model_and_reuses_it(config, tmp_path):
  path = pretrain.base_model(config, str(tmp_path))
  assert pretrain.is_complete(path) and _published(tmp_path) == [os.path.basename(path)]
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary left behind
  stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
  assert pretrain.base_model(config, str(tmp_path)) == path
  assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp  # not rebuilt


def test_an_incomplete_directory_is_set_aside_and_rebuilt(config, tmp_path):
  # What the old race left: the tokenizer and pretrain.json, no config.json, no weights.
  path = os.path.join(tmp_path, pretrain._key(config))
  os.makedirs(path)
  open(os.path.join(path, "pretrain.json"), "w").write("{}")
  assert pretrain.base_model(config, str(tmp_path)) == path
  assert pretrain.is_complete(path)
  aside = [d for d in os.listdir(tmp_path) if ".incomplete-" in d]
  assert len(aside) == 1 and os.listdir(os.path.join(tmp_path, aside[0])) == ["pretrain.json"]


def test_a_concurrent_publish_wins_and_is_kept(config, tmp_path, monkeypatch):
  """Another process renames its copy into place while this one builds: this one's rename
  fails, theirs is kept, this one's copy is removed."""
  build = pretrain.build
  path = os.path.join(tmp_path, pretrain._key(config))

  def build_while_another_publishes(cfg, tmp):
    out = build(cfg, tmp)
    build(cfg, path + ".other")
    os.rename(path + ".other", path)
    open(os.path.join(path, "theirs"), "w").close()
    return out

  monkeypatch.setattr(pretrain, "build", build_while_another_publishes)
  assert pretrain.base_model(config, str(tmp_path)) == path
  assert os.path.exists(os.path.join(path, "theirs")) and pretrain.is_complete(path)
  assert os.listdir(tmp_path) == [os.path.basename(path)]
