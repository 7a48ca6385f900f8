"""The Flax Qwen2 against transformers' Qwen2ForCausalLM on tiny random models built in the test."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import make_tiny_hf
from explore_jax.models import qwen2
from explore_jax.models.qwen2 import Qwen2Config

# bfloat16 parameters and compute vs the float32 reference, on logits of std ~0.75 and max ~3
# (measured: max 0.033, mean 0.006). Stated tolerance of the bfloat16 path:
BF16_MAX_ABS, BF16_MEAN_ABS = 0.1, 0.02


# Jitted: one compile per config instead of one per op.
_forward = jax.jit(qwen2.forward, static_argnums=2)
_forward_hidden = jax.jit(qwen2.forward_hidden, static_argnums=2)
_critic_values = jax.jit(qwen2.critic_values, static_argnums=2)


def _tokens(shape, vocab=96, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("tied,heads,kv_heads,width", [
    (False, 4, 4, 64),  # q/kv ratio 1 (plain multi-head)
    (True, 4, 2, 64),  # ratio 2
    (False, 7, 1, 56),  # ratio 7 (head_dim 8)
    (True, 7, 1, 56),
])
def test_logits_match_transformers_float32(tied, heads, kv_heads, width):
  t = make_tiny_hf(tie_word_embeddings=tied, num_attention_heads=heads,
                   num_key_value_heads=kv_heads, hidden_size=width)
  assert ("lm_head" in t.params) == (not tied)
  tokens = _tokens((2, 12))
  ref = t.hf_logits(tokens)
  assert ref.std() > 0.3  # the reference is not near-constant, so the bound below means something
  logits = _forward(t.params, jnp.asarray(tokens), t.config)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 12, 96)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_bfloat16_within_stated_tolerance(tiny_hf_model):
  t = tiny_hf_model
  tokens = _tokens((3, 16))
  ref = t.hf_logits(tokens)
  cfg = t.config.replace(param_dtype="bfloat16", dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), t.params)
  shapes = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.key(0)))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
  logits = np.asarray(_forward(params, jnp.asarray(tokens), cfg))
  err = np.abs(logits - ref)
  assert err.max() <= BF16_MAX_ABS and err.mean() <= BF16_MEAN_ABS, (err.max(), err.mean())
  assert err.max() > 1e-4  # it really computed in bfloat16


def test_left_padded_batch_matches_unpadded_rows(tiny_hf_model):
  t = tiny_hf_model
  lengths, width = [10, 4, 1, 7], 10
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 96, (len(lengths), width)).astype(np.int32)  # garbage in the padding
  mask = (np.arange(width)[None] >= width - np.asarray(lengths)[:, None]).astype(np.int32)
  logits = np.asarray(_forward(t.params, jnp.asarray(tokens), t.config, jnp.asarray(mask)))
  for row, n in enumerate(lengths):
    ref = t.hf_logits(tokens[row:row + 1, width - n:])[0]  # the same row without padding
    np.testing.assert_allclose(logits[row, width - n:], ref, atol=1e-4, rtol=0)


def test_cached_prefill_and_decode_match_full_forward(tiny_hf_model):
  t = tiny_hf_model
  cfg, params = t.config, t.params
  lengths, prompt, steps = np.asarray([6, 3]), 6, 5
  tokens = _tokens((2, prompt + steps), seed=2)
  mask = np.ones_like(tokens)
  mask[:, :prompt] = np.arange(prompt)[None] >= prompt - lengths[:, None]  # left-padded prompts
  full = np.asarray(_forward(params, jnp.asarray(tokens), cfg, jnp.asarray(mask)))

  cache = qwen2.init_cache(cfg, batch=2, max_len=prompt + steps + 3)
  positions = qwen2.positions_from_mask(jnp.asarray(mask))
  step = jax.jit(qwen2.apply_with_cache, static_argnums=5)
  logits, cache = step(params, jnp.asarray(tokens[:, :prompt]), positions[:, :prompt],
                       jnp.asarray(mask[:, :prompt]), cache, cfg)
  got = [np.asarray(logits)]
  for i in range(prompt, prompt + steps):
    logits, cache = step(params, jnp.asarray(tokens[:, i:i + 1]), positions[:, i:i + 1],
                         jnp.ones((2, 1), jnp.int32), cache, cfg)
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], full[real], atol=1e-4, rtol=0)
  assert int(cache.index) == prompt + steps
  # And the decoded row without padding equals transformers.
  np.testing.assert_allclose(got[1, prompt - 3:], t.hf_logits(tokens[1:, prompt - 3:])[0],
                             atol=1e-4, rtol=0)


def test_critic_shares_the_actor_backbone(tiny_hf_model):
  t = tiny_hf_model
  cfg = t.config
  critic = qwen2.critic_from_actor(t.params, cfg)
  rng = np.random.default_rng(3)
  critic["value_head"] = jnp.asarray(rng.normal(size=cfg.hidden_size), jnp.float32)
  critic["value_bias"] = jnp.asarray(0.7, jnp.float32)
  tokens = jnp.asarray(_tokens((2, 9), seed=3))
  mask = jnp.asarray(np.arange(9)[None] >= np.asarray([[0], [4]]), jnp.int32)
  values = _critic_values(critic, tokens, cfg, mask)
  assert values.shape == (2, 9) and values.dtype == jnp.float32
  hidden = _forward_hidden(t.params, tokens, cfg, mask)  # the actor's backbone
  np.testing.assert_allclose(np.asarray(values), np.asarray(hidden @ critic["value_head"] + 0.7),
                             atol=1e-5, rtol=1e-5)
  fresh = qwen2.init_critic_params(cfg, jax.random.key(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(critic)
  np.testing.assert_array_equal(np.asarray(_critic_values(fresh, tokens, cfg, mask)), 0.0)


@pytest.mark.parametrize("critic", [False, True])
def test_logical_axes_name_every_dimension(critic):
  cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
  init = qwen2.init_critic_params if critic else qwen2.init_params
  shapes = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
  specs = qwen2.logical_axes(cfg, critic=critic)
  assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(shapes)
  pairs = zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)), jax.tree.leaves(shapes))
  for spec, shape in pairs:
    assert len(spec) == len(shape.shape) and all(isinstance(name, str) for name in spec), spec
  layer = specs["model"]["layers_0"]
  assert specs["model"]["embed_tokens"] == P("vocab", "embed")
  assert layer["self_attn"]["k_proj"] == P("embed", "kv_heads", "head_dim")
  assert layer["mlp"]["down_proj"] == P("mlp", "embed")
  if not critic:
    assert specs["lm_head"] == P("embed", "vocab")


def test_config_from_transformers_config_json(tmp_path):
  import transformers
  hf_cfg = transformers.Qwen2Config(
      vocab_size=96, hidden_size=56, intermediate_size=80, num_hidden_layers=3,
      num_attention_heads=7, num_key_value_heads=1, rope_theta=1234.0, rms_norm_eps=1e-5,
      tie_word_embeddings=True, max_position_embeddings=512, eos_token_id=[5, 6])
  hf_cfg.save_pretrained(tmp_path)
  cfg = Qwen2Config.from_hf_json(tmp_path)
  assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
      96, 56, 80, 3)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (7, 1, 8)
  assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (1234.0, 1e-5, True)
  assert (cfg.max_position_embeddings, cfg.eos_token_id) == (512, 5)
  # to_hf_dict is read back by transformers with the same numbers.
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  back = transformers.AutoConfig.from_pretrained(tmp_path)
  assert back.rope_parameters["rope_theta"] == 1234.0 and back.num_key_value_heads == 1


@pytest.mark.parametrize("change,words", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, ["config.json", "llama"]),
    ({"use_sliding_window": True}, ["config.json", "use_sliding_window"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["config.json", "yarn"]),
])
def test_config_refuses_what_it_does_not_implement(tmp_path, change, words):
  d = {**Qwen2Config(96, 64, 96, 2, 4, 2).to_hf_dict(), **change}
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(ValueError) as e:
    Qwen2Config.from_hf_json(tmp_path)
  assert all(w in str(e.value) for w in words), str(e.value)


def _count(cfg):
  shapes = jax.eval_shape(lambda: qwen2.init_params(cfg, jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name,params", [
    ("qwen2.5-0.5b", 494_032_768),  # the published parameter counts of the released checkpoints
    ("qwen2.5-1.5b", 1_543_714_304),
    ("qwen2.5-3b", 3_085_938_688),
    ("qwen2.5-7b", 7_615_616_512),
    ("qwen2.5-math-7b", 7_615_616_512),
])
def test_presets_have_the_published_sizes(name, params):
  assert _count(qwen2.preset(name)) == params


def test_preset_fields():
  math = qwen2.preset("qwen2.5-math-7b")
  assert (math.rope_theta, math.max_position_embeddings, math.tie_word_embeddings) == (
      1e4, 4096, False)
  small = qwen2.preset("qwen2.5-0.5b", param_dtype="bfloat16")
  assert (small.head_dim, small.group_size, small.param_dtype) == (64, 7, "bfloat16")
  with pytest.raises(ValueError, match="qwen2.5-9b"):
    qwen2.preset("qwen2.5-9b")


def test_init_params_distributions_and_structure():
  cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, param_dtype="bfloat16")
  params = qwen2.init_params(cfg, jax.random.key(0))
  flax_shapes = jax.eval_shape(  # what Flax's own init would build
      lambda r: qwen2.nn.unbox(qwen2._init(qwen2.Qwen2ForCausalLM(cfg), cfg, r)), jax.random.key(0))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), flax_shapes)
  l0, l1 = params["model"]["layers_0"], params["model"]["layers_1"]
  assert abs(float(jnp.std(l0["mlp"]["up_proj"].astype(jnp.float32))) - 0.02) < 0.002
  assert not np.array_equal(np.asarray(l0["mlp"]["up_proj"]), np.asarray(l1["mlp"]["up_proj"]))
  assert not np.array_equal(np.asarray(l0["mlp"]["up_proj"]), np.asarray(l0["mlp"]["gate_proj"]))
  assert float(jnp.abs(l0["self_attn"]["q_bias"]).max()) == 0.0
  assert float(l1["post_attention_layernorm"]["weight"].min()) == 1.0
  again = qwen2.init_params(cfg, jax.random.PRNGKey(0))  # raw uint32 keys work too
  other = qwen2.init_params(cfg, jax.random.key(1))
  assert np.array_equal(np.asarray(again["lm_head"]), np.asarray(params["lm_head"]))
  assert not np.array_equal(np.asarray(other["lm_head"]), np.asarray(params["lm_head"]))
