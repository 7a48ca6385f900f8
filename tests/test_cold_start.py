"""A 2-process job on a machine whose cache has no base model yet: both processes build it, one
copy is published whole, and the job runs (an older release published process 1's copy, which
had no weights, in 3 of 4 tries, and every later run of that config failed)."""

import os

import pytest

from explore_jax import pretrain
from test_multihost import REPO, launch_two
from test_train import _command, read_metrics, train_env  # noqa: F401


@pytest.mark.slow
def test_two_processes_build_and_publish_one_complete_base_model(train_env, tmp_path):  # noqa: F811
  cache = tmp_path / "empty_cache"
  env = dict(train_env, EXPLORE_JAX_CACHE=str(cache))
  # A short pre-training: the publishing, not the model, is under test.
  cmd = _command(tmp_path / "run", "baseline", ["--config.total_steps=1", "--config.export_hf=False",
                                                "--config.pretrain.steps=20"])
  launch_two([cmd, cmd], env, REPO)
  assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
  published = sorted(os.listdir(cache / "base_models"))
  assert len(published) == 1, published  # no temporary copy left behind either
  assert pretrain.is_complete(str(cache / "base_models" / published[0]))
