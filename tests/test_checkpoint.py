"""HF safetensors <-> params <-> orbax, checked against transformers' save/from_pretrained."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import make_tiny_hf
from explore_jax.models import checkpoint, qwen2
from explore_jax.tpu import sharding

TOKENS = np.random.default_rng(0).integers(0, 96, (2, 10))
_forward = jax.jit(qwen2.forward, static_argnums=2)


def _read_all(path: str) -> dict[str, np.ndarray]:
  out = {}
  for fn in sorted(os.listdir(path)):
    if fn.endswith(".safetensors"):
      with safe_open(os.path.join(path, fn), "np") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _hf_from(path: str):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _hf_logits(model) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS)).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """One tiny model (tied) saved by transformers as a single file and as ~10 shards."""
  t = make_tiny_hf(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=1)
  single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
  t.hf.save_pretrained(single)
  t.hf.save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.exists(sharded / checkpoint.INDEX_FILE)
  return t, str(single), str(sharded)


@pytest.mark.parametrize("source,export_shard_bytes", [("single", 10**9), ("sharded", 40_000)])
def test_hf_round_trip_is_bit_identical_and_loads_in_transformers(hf_dirs, tmp_path, source,
                                                                  export_shard_bytes):
  t, single, sharded = hf_dirs
  src = single if source == "single" else sharded
  config, params = checkpoint.load_hf(src)
  assert config == t.config
  np.testing.assert_allclose(np.asarray(_forward(params, jnp.asarray(TOKENS), config)),
                             t.hf_logits(TOKENS), atol=1e-4, rtol=0)
  out = tmp_path / "export"
  checkpoint.save_hf(config, params, out, max_shard_bytes=export_shard_bytes)
  assert os.path.exists(out / checkpoint.INDEX_FILE) == (export_shard_bytes < 10**9)
  before, after = _read_all(src), _read_all(str(out))
  assert sorted(before) == sorted(after)
  for name in before:
    assert before[name].dtype == after[name].dtype and before[name].shape == after[name].shape
    assert before[name].tobytes() == after[name].tobytes(), name
  np.testing.assert_array_equal(_hf_logits(_hf_from(str(out))), t.hf_logits(TOKENS))


def test_save_hf_to_a_bucket_writes_what_it_writes_to_a_disk(hf_dirs, tmp_path, fake_bucket):
  from etils import epath
  _, single, _ = hf_dirs
  config, params = checkpoint.load_hf(single)
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text('{"version": "1.0"}')
  local = tmp_path / "local"
  checkpoint.save_hf(config, params, local, tokenizer_dir=tok, max_shard_bytes=30_000)
  bucket = epath.Path("gs://bucket/run/hf")
  bucket.mkdir(parents=True)
  (bucket / "model-00001-of-00009.safetensors").write_bytes(b"an older export's shard")
  checkpoint.save_hf(config, params, "gs://bucket/run/hf", tokenizer_dir=tok,
                     max_shard_bytes=30_000)
  names = sorted(os.listdir(local))
  assert checkpoint.INDEX_FILE in names and "tokenizer.json" in names
  assert sorted(p.name for p in bucket.iterdir()) == names  # the old shard is gone
  for name in names:
    assert (bucket / name).read_bytes() == (local / name).read_bytes(), name


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path):
  import torch
  t = make_tiny_hf(seed=1)
  t.hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  config, params = checkpoint.load_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
  assert (config.param_dtype, config.dtype) == ("bfloat16", "bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  checkpoint.save_hf(config, params, tmp_path / "out")
  before, after = _read_all(str(tmp_path / "bf16")), _read_all(str(tmp_path / "out"))
  assert sorted(before) == sorted(after)
  assert all(before[k].tobytes() == after[k].tobytes() for k in before)
  with safe_open(str(tmp_path / "out" / checkpoint.SINGLE_FILE), "np") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_orbax_round_trip_and_load_model_dispatch(hf_dirs, tmp_path):
  t, single, _ = hf_dirs
  config, params = checkpoint.load_model(single)  # an HF directory
  checkpoint.save_orbax(config, params, tmp_path / "actor")
  config2, params2 = checkpoint.load_model(tmp_path / "actor")  # an orbax directory
  assert config2 == config
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  critic = qwen2.critic_from_actor(params, config)
  critic["value_bias"] = jnp.asarray(0.25, jnp.float32)
  checkpoint.save_orbax(config, critic, tmp_path / "critic")
  _, critic2 = checkpoint.load_orbax(tmp_path / "critic", dtype=jnp.bfloat16)
  assert critic2["value_bias"] == 0.25 and critic2["value_head"].dtype == jnp.bfloat16
  with pytest.raises(FileNotFoundError, match="neither"):
    checkpoint.load_model(tmp_path)


def _mesh_shardings(mesh):
  def fn(config):
    shapes = jax.eval_shape(lambda: qwen2.init_params(config, jax.random.key(0)))
    return sharding.logical_to_mesh(qwen2.logical_axes(config), shapes, mesh)
  return fn


def test_load_onto_a_mesh(hf_dirs, tmp_path):
  t, _, sharded = hf_dirs
  mesh = sharding.make_mesh((1, -1, 1))  # fsdp over however many devices this process has
  config, params = checkpoint.load_hf(sharded, shardings=_mesh_shardings(mesh))
  expected = _mesh_shardings(mesh)(config)
  for x, s, ref in zip(jax.tree.leaves(params), jax.tree.leaves(expected),
                       jax.tree.leaves(t.params)):
    assert x.sharding == s
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
  checkpoint.save_orbax(config, params, tmp_path / "o")
  _, restored = checkpoint.load_orbax(tmp_path / "o", shardings=_mesh_shardings(mesh))
  assert restored["model"]["embed_tokens"].sharding == expected["model"]["embed_tokens"]


_FAKE_DEVICES_SCRIPT = """
import jax, numpy as np, sys
sys.path.insert(0, sys.argv[2])
from test_checkpoint import _mesh_shardings
from explore_jax.models import checkpoint
from explore_jax.tpu import sharding
assert jax.device_count() == 4
mesh = sharding.make_mesh((1, 2, 2))
config, params = checkpoint.load_hf(sys.argv[1], shardings=_mesh_shardings(mesh))
embed = params["model"]["embed_tokens"]  # [V, D] = [96, 64]: vocab over tensor, embed over fsdp
assert {s.data.shape for s in embed.addressable_shards} == {(48, 32)}, embed.sharding
k = params["model"]["layers_0"]["self_attn"]["k_proj"]  # [D, 1, H]: 1 kv head stays whole
assert {s.data.shape for s in k.addressable_shards} == {(32, 1, 16)}
print("ok")
"""


def test_load_onto_fake_devices_in_a_subprocess(hf_dirs):
  if jax.device_count() > 1:
    pytest.skip("test_load_onto_a_mesh already covers several devices")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  tests_dir = os.path.dirname(os.path.abspath(__file__))  # whatever pytest's working directory
  run = subprocess.run([sys.executable, "-c", _FAKE_DEVICES_SCRIPT, hf_dirs[2], tests_dir], env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_convert_cli_both_directions(hf_dirs, tmp_path):
  t, single, _ = hf_dirs
  hf_dir = tmp_path / "hf"
  shutil.copytree(single, hf_dir)
  (hf_dir / "tokenizer.json").write_text('{"fake": "tokenizer"}')
  (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 128}')
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cli = [sys.executable, "-m", "explore_jax.convert"]
  for args in (["hf-to-orbax", "--hf_dir", str(hf_dir), "--out", str(tmp_path / "orbax")],
               ["orbax-to-hf", "--checkpoint", str(tmp_path / "orbax"), "--out",
                str(tmp_path / "back")]):
    run = subprocess.run(cli + args, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
  back = tmp_path / "back"
  assert (back / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
  assert (back / "generation_config.json").exists()
  np.testing.assert_array_equal(_hf_logits(_hf_from(str(back))), t.hf_logits(TOKENS))
  run = subprocess.run(cli + ["orbax-to-hf", "--checkpoint", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "x")], env=env, capture_output=True, text=True)
  assert run.returncode != 0 and "explore_jax_model.json" in run.stderr


class _Evil:
  """Unpickling this writes a marker file: proof that a loader executed checkpoint code."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _rewrite_single(path, edit):
  fn = os.path.join(path, checkpoint.SINGLE_FILE)
  tensors = _read_all(path)
  edit(tensors)
  save_file(tensors, fn, metadata={"format": "pt"})


def _break(case, path, tmp_path):
  if case == "missing_shard":
    os.remove(os.path.join(path, sorted(os.listdir(path))[-3]))  # model-0000k-of-0000n
  elif case == "unexpected_key":
    _rewrite_single(path, lambda t: t.update({"model.layers.0.self_attn.extra": np.zeros(3)}))
  elif case == "missing_key":
    _rewrite_single(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  elif case == "shape_mismatch":
    _rewrite_single(path, lambda t: t.update(
        {"model.layers.1.self_attn.k_proj.bias": np.zeros(3, np.float32)}))
  elif case == "not_qwen2":
    config_json = pathlib.Path(path, "config.json")
    cfg = json.loads(config_json.read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config_json.write_text(json.dumps(cfg))
  elif case in ("truncated", "garbled_header"):
    fn = pathlib.Path(path, checkpoint.SINGLE_FILE)
    raw = fn.read_bytes()
    fn.write_bytes(raw[:len(raw) // 2] if case == "truncated" else b"\xff" * 8 + raw[8:])
  elif case == "pickle_only":
    os.remove(os.path.join(path, checkpoint.SINGLE_FILE))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
      pickle.dump(_Evil(str(tmp_path / "EXECUTED")), f)


@pytest.mark.parametrize("case,error,words", [
    ("missing_shard", FileNotFoundError, ["{removed}", "index.json"]),
    ("unexpected_key", ValueError, ["model.safetensors", "model.layers.0.self_attn.extra"]),
    ("missing_key", ValueError, ["model.safetensors", "model.layers.1.mlp.up_proj.weight"]),
    ("shape_mismatch", ValueError, ["model.safetensors", "model.layers.1.self_attn.k_proj.bias",
                                    "(3,)", "(16,)"]),
    ("not_qwen2", ValueError, ["config.json", "llama"]),
    ("pickle_only", ValueError, ["pytorch_model.bin", "safetensors"]),
    # safetensors' own errors name no file ("incomplete metadata, file not fully covered").
    ("truncated", ValueError, ["ckpt/model.safetensors", "not a readable safetensors file",
                               "incomplete metadata"]),
    ("garbled_header", ValueError, ["ckpt/model.safetensors", "not a readable safetensors file"]),
])
def test_bad_checkpoints_name_the_file_and_tensor(hf_dirs, tmp_path, case, error, words):
  _, single, sharded = hf_dirs
  path = str(tmp_path / "ckpt")
  shutil.copytree(sharded if case == "missing_shard" else single, path)
  removed = sorted(os.listdir(path))[-3]
  _break(case, path, tmp_path)
  words = [w.format(removed=removed) for w in words]
  with pytest.raises(error) as e:
    checkpoint.load_hf(path)
  assert all(w in str(e.value) for w in words), str(e.value)
  assert not (tmp_path / "EXECUTED").exists()
