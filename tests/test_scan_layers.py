"""model.scan_layers (stacked decoder layers) and named remat policies against the per-layer model."""

from __future__ import annotations

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explore_jax.models import checkpoint, qwen2
from explore_jax.train import export as convert
from explore_jax.train import state as train_state

_TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 10)), jnp.int32)
_MASK = jnp.asarray(np.arange(10)[None] >= np.array([[0], [4]]), jnp.int32)  # one row left-padded


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("policy", ["full", "projections"])  # "none": the decode test below
def test_scanned_forward_and_gradients_equal_per_layer(tiny_hf_model, policy):
  cfg, params = tiny_hf_model.config, tiny_hf_model.params
  scan = cfg.replace(scan_layers=True, remat_policy=policy)
  stacked = qwen2.stack_layers(params)
  assert stacked["model"]["layers"]["mlp"]["up_proj"].shape == (2, 64, 96)
  assert jax.tree.structure(stacked) == jax.tree.structure(qwen2.param_shapes(scan))

  def loss(p, c):
    logits = qwen2.forward(p, _TOKENS, c, attention_mask=_MASK)
    return jnp.sum(jnp.where(_MASK[..., None] > 0, jnp.sin(logits), 0.0)), logits

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  g_ref, l_ref = grad(params, cfg)
  g_scan, l_scan = grad(stacked, scan)
  real = _MASK[..., None] > 0
  assert _rel(jnp.where(real, l_scan, 0), jnp.where(real, l_ref, 0)) < 1e-6
  for a, b in zip(jax.tree.leaves(qwen2.stack_layers(g_ref)), jax.tree.leaves(g_scan)):
    assert _rel(b, a) < 1e-5


def test_scanned_params_decode_like_the_full_forward(tiny_hf_model):
  cfg = tiny_hf_model.config.replace(scan_layers=True)
  params = qwen2.stack_layers(tiny_hf_model.params)
  full = qwen2.forward(params, _TOKENS, cfg)  # scanned
  np.testing.assert_allclose(full, qwen2.forward(tiny_hf_model.params, _TOKENS,
                                                 tiny_hf_model.config), atol=1e-5)
  cache = qwen2.init_cache(cfg, 2, 10)
  ones = jnp.ones((2, 1), jnp.int32)
  step = jax.jit(qwen2.apply_with_cache, static_argnums=5)
  for t in range(10):  # one token at a time through the cache, layers unrolled
    logits, cache = step(params, _TOKENS[:, t:t + 1], ones * t, ones, cache, cfg)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4)


def test_hf_and_orbax_round_trips_with_scan_layers(tiny_hf_model, tmp_path):
  cfg = tiny_hf_model.config.replace(scan_layers=True)
  stacked = qwen2.stack_layers(tiny_hf_model.params)
  checkpoint.save_hf(cfg, stacked, tmp_path / "hf")
  # the HF directory is the per-layer one transformers reads
  _, per_layer = checkpoint.load_hf(tmp_path / "hf")
  for a, b in zip(jax.tree.leaves(per_layer), jax.tree.leaves(tiny_hf_model.params)):
    np.testing.assert_array_equal(a, b)
  loaded_cfg, loaded = checkpoint.load_hf(tmp_path / "hf", scan_layers=True)
  assert loaded_cfg.scan_layers
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(stacked)):
    np.testing.assert_array_equal(a, b)
  # an orbax model saved per layer: converted by the CLI, or restacked by load_model
  checkpoint.save_orbax(tiny_hf_model.config, per_layer, tmp_path / "flat")
  convert.main(["restack", "--checkpoint", str(tmp_path / "flat"), "--out",
                str(tmp_path / "stacked"), "--scan_layers", "true"])
  for path in ("stacked", "flat"):
    c, p = checkpoint.load_model(tmp_path / path, scan_layers=True)
    assert c.scan_layers and qwen2.params_layout(p) == "stacked"
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(stacked)):
      np.testing.assert_array_equal(a, b)


@flax.struct.dataclass
class _State:  # the part of a TrainState that restore_latest looks at
  actor: dict
  step: jax.Array


def test_restoring_the_other_layout_is_an_error_not_a_torn_checkpoint(tiny_hf_model, tmp_path):
  flat = _State(tiny_hf_model.params, jnp.int32(3))
  ckpt = train_state.Checkpointer(str(tmp_path / "ck"), keep=2)
  ckpt.save(3, flat, {"epoch": 0})
  ckpt.wait()
  stacked = _State(qwen2.stack_layers(tiny_hf_model.params), jnp.int32(0))
  shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  with pytest.raises(ValueError, match=r"per-layer \(model.scan_layers=False\) but this config "
                                       r"has model.scan_layers=True"):
    ckpt.restore_latest(shapes(stacked))
  assert os.listdir(tmp_path / "ck") == ["3"]  # not set aside as torn
  restored, data = ckpt.restore_latest(shapes(flat))  # the matching layout still restores
  assert int(restored.step) == 3 and data == {"epoch": 0}
  ckpt.close()


def test_remat_policy_is_checked():
  with pytest.raises(ValueError, match="remat_policy='some'"):
    qwen2.preset("qwen2.5-0.5b", remat_policy="some")
  assert qwen2.preset("qwen2.5-0.5b", remat=True).remat_mode == "full"
  assert qwen2.preset("qwen2.5-0.5b", remat=True, remat_policy="none").remat_mode == "none"
