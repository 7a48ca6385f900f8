"""Models, tokenizers and datasets by hub id, read offline from a hub cache the test lays out.

The cache is what huggingface_hub writes (models--ORG--NAME/{blobs, refs/main, snapshots/REV});
HF_HUB_OFFLINE=1 throughout, so nothing is downloaded and a missing id must fail at once.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import fill_hub_cache, make_tiny_hf
from explore_jax import data, paths
from explore_jax.config import defaults
from explore_jax.models import checkpoint, files, hub
from explore_jax.train import setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A tiny random Qwen2 saved by transformers (bf16), with the project's tiny tokenizer and a
  generation config of its own."""
  import torch

  from explore_jax.data import tokenizer as tokenizer_lib
  out = tmp_path_factory.mktemp("tiny_hf")
  tiny = make_tiny_hf(vocab_size=384, eos_token_id=0, bos_token_id=0)
  tiny.hf.to(torch.bfloat16).save_pretrained(out)
  tokenizer_lib.build_tiny_tokenizer(str(out), num_examples=200)
  (out / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": 0, "eos_token_id": [0, 2], "temperature": 0.7, "top_p": 0.8}))
  return out


def test_hub_id_resolves_to_the_cached_snapshot(offline_hub, tiny_model_dir, tmp_path,
                                                monkeypatch):
  snapshot = fill_hub_cache(offline_hub, "org/tiny", tiny_model_dir)
  got = files.local_dir("org/tiny", "config.model.path")
  assert os.path.realpath(got) == os.path.realpath(snapshot)
  assert checkpoint.load_model_config(got).vocab_size == 384
  # A revision names another snapshot; a local folder of the same name wins over the id.
  other = fill_hub_cache(offline_hub, "org/tiny", tiny_model_dir, revision="v2", commit="f" * 40)
  assert os.path.realpath(files.local_dir("org/tiny@v2", "m")) == os.path.realpath(other)
  monkeypatch.chdir(tmp_path)
  (tmp_path / "org" / "tiny").mkdir(parents=True)
  assert files.local_dir("org/tiny", "m") == str(tmp_path / "org" / "tiny")


def test_missing_id_offline_is_one_clear_error(offline_hub):
  with pytest.raises(hub.Unavailable) as e:
    files.local_dir("org/absent@v1", "config.model.path")
  msg = str(e.value)
  assert msg.startswith("config.model.path=org/absent@v1: not in the hub cache ")
  assert str(offline_hub / "hub") in msg and "HF_HUB_OFFLINE is set" in msg
  assert "`hf download org/absent --revision v1`" in msg and "\n" not in msg


def test_the_dry_run_reads_config_json_alone_and_bare_names_stay_presets(offline_hub,
                                                                         tiny_model_dir, tmp_path):
  only_config = tmp_path / "only_config"
  only_config.mkdir()
  (only_config / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
  fill_hub_cache(offline_hub, "org/config-only", only_config)
  c = defaults.base_config()
  c.model.path = "org/config-only"  # no weights, no tokenizer in the cache: still enough
  cfg = setup.model_config(c)
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (384, 64, 2)
  with pytest.raises(hub.Unavailable, match="model.path=org/tiny"):  # not cached: no preset
    c.model.path = "org/tiny"
    setup.model_config(c)
  c.model.path = "Qwen2.5-7B"  # the 7B configs' bare name: the preset, nothing fetched
  assert setup.model_config(c).hidden_size == 3584


def test_every_host_checks_the_files_it_fetched(offline_hub, tiny_model_dir, monkeypatch):
  # On a pod each host fetches into its own cache and the hosts compare what they read.
  snapshot = fill_hub_cache(offline_hub, "org/tiny", tiny_model_dir)
  seen = []
  monkeypatch.setattr(setup.sharding, "check_same_on_every_host",
                      lambda what, value: seen.append((what, value)))
  c = defaults.base_config()
  c.model.path = "org/tiny"
  model_dir, tokenizer_dir = setup.resolve_model(c)
  assert model_dir == tokenizer_dir and os.path.realpath(model_dir) == os.path.realpath(snapshot)
  assert seen == [("train: the model files of org/tiny", files.model_fingerprint(snapshot))]


def test_a_model_without_a_tokenizer_fails_before_the_workdir(offline_hub, tiny_model_dir,
                                                              tmp_path):
  weights_only = tmp_path / "weights_only"
  weights_only.mkdir()
  for fn in ("config.json", "model.safetensors"):
    (weights_only / fn).write_bytes((tiny_model_dir / fn).read_bytes())
  fill_hub_cache(offline_hub, "org/no-tokenizer", weights_only)
  c = defaults.base_config()
  c.model.path = "org/no-tokenizer"
  with pytest.raises(checkpoint.NoTokenizer, match="config.model.path: .* holds no Hugging Face "
                     "tokenizer .*config.model.tokenizer"):
    setup.resolve_model(c)
  fill_hub_cache(offline_hub, "org/tok", tiny_model_dir)
  c.model.tokenizer = "org/tok"  # the tokenizer by id: its files only
  assert os.path.exists(os.path.join(setup.resolve_model(c)[1], "tokenizer.json"))


def _generate(args, env):
  return subprocess.run([sys.executable, "-m", "explore_jax.generate", *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_generate_by_hub_id_offline(offline_hub, tiny_model_dir):
  fill_hub_cache(offline_hub, "org/tiny", tiny_model_dir)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = _generate(["--model", "org/tiny", "--prompt", "1+1=", "--n", "1", "--max_new_tokens",
                    "4", "--temperature", "0"], env)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("=== prompt 0 sample 0 (")
  assert "bfloat16" in proc.stderr  # the checkpoint's own dtype by default
  assert "Unable to initialize backend" not in proc.stderr  # third-party INFO stays quiet
  proc = _generate(["--model", "org/absent", "--prompt", "1+1="], env)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: --model=org/absent: not in the hub cache {offline_hub}/hub and HF_HUB_OFFLINE is "
      "set; fetch it where the hub can be reached (`hf download org/absent`, with the same "
      "HF_HOME) or give a local directory"]


def test_dataset_by_hub_id(offline_hub, tmp_path):
  src = tmp_path / "ds"
  (src / "data").mkdir(parents=True)
  pq.write_table(pa.table({"question": ["What is 2+3?", "What is 7*6?"],
                           "meta": [{"final": "5"}, {"final": "42"}]}),
                 src / "data" / "test-00000-of-00001.parquet")
  with open(src / "data" / "train-00000-of-00001.parquet", "wb") as f:
    pq.write_table(pa.table({"question": ["x"], "meta": [{"final": "1"}]}), f)
  (src / "README.md").write_text("a card\n")
  fill_hub_cache(offline_hub, "org/sums", src, repo_type="dataset")
  recs = data.load("hf:org/sums", "test", problem_field="question", answer_field="meta.final")
  assert [(r["problem"], r["answer"]) for r in recs] == [("What is 2+3?", "5"),
                                                         ("What is 7*6?", "42")]
  assert len(data.load("hf:org/sums", "train", problem_field="question",
                       answer_field="meta.final")) == 1
  named = data.load("hf:org/sums:data/train-00000-of-00001.parquet", "test",
                    problem_field="question", answer_field="meta.final")
  assert [r["answer"] for r in named] == ["1"]  # the named file, whatever the split
  with pytest.raises(hub.Unavailable, match=r"no data files for split 'validation' among \["
                     r"'data/test-00000-of-00001.parquet', 'data/train-00000-of-00001.parquet'\]"):
    data.load("hf:org/sums", "validation", problem_field="question", answer_field="meta.final")
  with pytest.raises(hub.Unavailable, match="dataset=org/absent: not in the hub cache"):
    data.load("hf:org/absent", "test")


def test_a_missing_local_path_is_named(tmp_path):
  with pytest.raises(files.NotFound, match=r"--model=\./nowhere: no such file or directory"):
    files.local_dir("./nowhere", "--model")
