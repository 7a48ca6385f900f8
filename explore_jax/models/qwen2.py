"""Qwen2 / Qwen2.5 decoder in Flax Linen, with an explicit KV cache and a critic variant.

Einsum letters, used in every shape comment of this file:
  B batch, T query length, S key length (cache slots), N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, D width, F MLP width, V vocab, L layers.

Parameters keep Hugging Face names (`q_proj`, `gate_proj`, `input_layernorm`, ...) so that conversion
is a rename-and-reshape table (see `explore_jax.models.checkpoint`). Projection kernels are stored per head
(`q_proj.kernel` is [D, N, H]) so that heads can be sharded by a logical axis rule without reshapes.

The params pytree returned by `init_params` is a plain nested dict (no `{"params": ...}` wrapper):
  {"model": {"embed_tokens": ..., "layers_0": ..., ..., "norm": ...}, "lm_head": ...}   (actor)
  {"model": {...same backbone...}, "value_head": [D], "value_bias": []}                   (critic)
so a critic is initialised from an actor by copying `params["model"]`.

Attention semantics, shared by the full forward and the cached decode: every token sits in a cache
*slot*; slots are in time order for every row, so a left-padded batch is causal by slot index.
A query in slot q attends to the keys in slots s <= q whose `mask` is set. Positions (RoPE) are
explicit per row, so a left-padded row gets the same positions as the unpadded sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp

from explore_jax.models import attention as attention_lib
from explore_jax.models import decode_attention, paged_attention

Array = jax.Array
Params = dict[str, Any]

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Architecture of a Qwen2 decoder; hashable, so it can be a static jit argument."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151643
  param_dtype: str = "float32"  # storage dtype of the parameters
  dtype: str = "float32"  # compute dtype of activations and matmuls
  remat: bool = False  # rematerialise each decoder layer in the backward pass
  # Implementation of the uncached forward's attention (`explore_jax.models.attention`): auto,
  # dense, blockwise, splash or cudnn. The cached prefill/decode of the sampler is always dense.
  attention: str = "auto"
  # Training forward as one nn.scan over the decoder layers: parameters stacked on a leading
  # "layers" axis under model/layers (instead of model/layers_0 ...), one layer compiled once.
  scan_layers: bool = False
  # What a rematerialised layer keeps for the backward pass (`REMAT_POLICIES`); "" = `remat`
  # decides (True: "full", False: "none").
  remat_policy: str = ""

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def group_size(self) -> int:
    return self.num_attention_heads // self.num_key_value_heads

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
          f"{self.num_attention_heads}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name}={getattr(self, name)!r}: use float32, bfloat16 or float16")
    attention_lib.check(self.attention)
    if self.remat_policy not in ("",) + tuple(REMAT_POLICIES):
      raise ValueError(f"remat_policy={self.remat_policy!r}: use one of {sorted(REMAT_POLICIES)}")

  @property
  def remat_mode(self) -> str:
    return self.remat_policy or ("full" if self.remat else "none")

  def replace(self, **kw) -> "Qwen2Config":
    return dataclasses.replace(self, **kw)

  # -- Hugging Face config.json ------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, d: dict, *, source: str = "config.json", **overrides) -> "Qwen2Config":
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    if model_type != "qwen2" and not any(a.startswith("Qwen2") for a in archs):
      raise ValueError(
          f"{source}: model_type={model_type!r}, architectures={archs!r}: explore_jax only "
          "implements the Qwen2 architecture (Qwen2 / Qwen2.5 / Qwen2.5-Math).")
    # Variants this implementation would silently get wrong are refused by name.
    if d.get("use_sliding_window"):
      raise ValueError(f"{source}: use_sliding_window=true is not implemented (full attention)")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"{source}: rope_type={rope_type!r} is not implemented (default RoPE only)")
    if d.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{source}: hidden_act={d['hidden_act']!r}; Qwen2 uses silu")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"{source}: missing required field(s) {missing}")
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != d["hidden_size"] // d["num_attention_heads"]:
      raise ValueError(f"{source}: head_dim={head_dim} != hidden_size / num_attention_heads")
    rope_theta = d.get("rope_theta")
    if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
      rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 1e6)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
      eos = eos[0]
    kw = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
    )
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_hf_json(cls, path: str | os.PathLike, **overrides) -> "Qwen2Config":
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no config.json")
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(d, source=path, **overrides)

  def to_hf_dict(self) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": self.param_dtype,
    }


# Name -> what a decoder layer saves for its backward pass (None: no rematerialisation).
# "projections": the outputs of the q/k/v/o and MLP projections (2-D matmuls, no batch dims), the
# rest (norms, RoPE, attention, activations) recomputed.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "projections": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _preset(layers, width, mlp, heads, kv_heads, vocab, theta, tied, max_pos=32768):
  return Qwen2Config(vocab_size=vocab, hidden_size=width, intermediate_size=mlp,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, rope_theta=theta, tie_word_embeddings=tied,
                     max_position_embeddings=max_pos)


# The public config.json numbers of the released checkpoints (DESIGN.md section 2).
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": _preset(24, 896, 4864, 14, 2, 151936, 1e6, True),
    "qwen2.5-1.5b": _preset(28, 1536, 8960, 12, 2, 151936, 1e6, True),
    "qwen2.5-3b": _preset(36, 2048, 11008, 16, 2, 151936, 1e6, True),
    "qwen2.5-7b": _preset(28, 3584, 18944, 28, 4, 152064, 1e6, False, 131072),
    "qwen2.5-math-1.5b": _preset(28, 1536, 8960, 12, 2, 151936, 1e4, True, 4096),
    "qwen2.5-math-7b": _preset(28, 3584, 18944, 28, 4, 152064, 1e4, False, 4096),
}


def preset(name: str, **overrides) -> Qwen2Config:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


# Heads before slots: a decode step's attention is then two plain batched matmuls over [B, K]
# that read each layer's cache without a transpose.
CACHE_AXES = ("cache_batch", "kv_heads", "cache_length", "head_dim")


@flax.struct.dataclass
class KVCache:
  """One key and one value array per layer rather than a stacked [L, ...] pair: a layer then
  attends over a whole buffer of its own. Out of a stack, XLA:CPU copied every layer's slice at
  every decode step before reading it (in the compiled HLO), which cost 7% of the decode time at
  a 1K-token prompt (32 rows, a 4-layer width-128 model)."""

  k: tuple[Array, ...]  # per layer [B, K, S, H] (CACHE_AXES)
  v: tuple[Array, ...]  # per layer [B, K, S, H]
  mask: Array  # [B, S] bool: the slot holds a real (non-padding) token
  index: Array  # [] int32: the next slot to write; or [B]: one per row (the rollout engine)
  # Static: a decode step reads each row's filled blocks only (the rollout engine sets it);
  # None: every slot of every row (`attention.dense`).
  ragged: decode_attention.Ragged | None = flax.struct.field(pytree_node=False, default=None)

  def map(self, fn) -> "KVCache":
    """fn applied to every layer's key and value array."""
    return self.replace(k=tuple(map(fn, self.k)), v=tuple(map(fn, self.v)))


def _write_slots(buf: Array, x: Array, index: Array) -> Array:
  """Write x [B, ..., T, (H)] into buf [B, ..., S, (H)] at slot `index` ([] for all rows, or [B]
  one per row); the slot axis is axis 2 of a key/value array and axis 1 of a mask."""
  axis = 1 if buf.ndim == 2 else 2
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice_in_dim(buf, x, index, axis)
  row = lambda b, y, i: jax.lax.dynamic_update_slice_in_dim(b, y, i, axis - 1)
  return jax.vmap(row)(buf, x, index)


def init_cache(config: Qwen2Config, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
  shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  layers = range(config.num_hidden_layers)
  return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                 v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                 mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _param(module: nn.Module, name: str, shape, axes, init, config: Qwen2Config):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(config.param_dtype))


def _cast(x, config: Qwen2Config):
  return jnp.asarray(x, jnp.dtype(config.dtype))


def _project(rows: Array, w: Array, n_in: int) -> Array:
  """rows [R, *in] @ w [*in, *out] -> [R, *out]: one 2-D matmul over all rows.

  Callers flatten [B, T, ...] activations to rows first (once per input, however many weights
  read it): XLA:CPU runs the backward pass of a 2-D matmul (weight gradient = rows^T @ dy) several
  times faster than that of a batched [B, T, D] contraction (benchmarks/train_step.py); on
  TPU/GPU the two compile alike. The weight keeps its shape, so no reshaped copy of it is saved.
  """
  return jnp.tensordot(rows, w, axes=n_in)


_dense_init = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
  config: Qwen2Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = _param(self, "weight", (x.shape[-1],), ("norm",), nn.initializers.ones, self.config)
    # Normalise in float32 and scale in the compute dtype, as transformers' Qwen2RMSNorm does.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
    return _cast(weight, self.config) * x32.astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding in the half-split layout of Qwen2. x: [B, T, heads, H], positions: [B, T]."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
  config: Qwen2Config
  layer: int

  @nn.compact
  def __call__(self, x, positions, key_mask, query_slots,
               cache: KVCache | paged_attention.PagedCache | None):
    cfg = self.config
    n, k, h, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    wq = _param(self, "q_proj", (d, n, h), ("embed", "q_heads", "head_dim"), _dense_init, cfg)
    bq = _param(self, "q_bias", (n, h), ("q_heads", "head_dim"), nn.initializers.zeros, cfg)
    wk = _param(self, "k_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), _dense_init, cfg)
    bk = _param(self, "k_bias", (k, h), ("kv_heads", "head_dim"), nn.initializers.zeros, cfg)
    wv = _param(self, "v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), _dense_init, cfg)
    bv = _param(self, "v_bias", (k, h), ("kv_heads", "head_dim"), nn.initializers.zeros, cfg)
    wo = _param(self, "o_proj", (n, h, d), ("q_heads", "head_dim", "embed"), _dense_init, cfg)
    c = lambda w: _cast(w, cfg)

    b, t = x.shape[:2]
    rows = x.reshape(b * t, d)
    q = (_project(rows, c(wq), 1) + c(bq)).reshape(b, t, n, h)
    key = (_project(rows, c(wk), 1) + c(bk)).reshape(b, t, k, h)
    val = (_project(rows, c(wv), 1) + c(bv)).reshape(b, t, k, h)
    q = rope(q, positions, cfg.rope_theta)
    key = rope(key, positions, cfg.rope_theta).transpose(0, 2, 1, 3)  # [B, K, T, H]
    val = val.transpose(0, 2, 1, 3)

    if isinstance(cache, paged_attention.PagedCache):
      # The paged rollout engine's decode step: write into the rows' pages, read through the
      # page table.
      out, cache = paged_attention.decode_layer(cache, self.layer, q, key, val)
      return _project(out.reshape(b * t, n, h), c(wo), 2).reshape(b, t, d), cache
    if cache is not None:
      # Write this step's keys and values into their slots; attend over the whole cache.
      i = self.layer
      new_k = _write_slots(cache.k[i], key.astype(cache.k[i].dtype), cache.index)
      new_v = _write_slots(cache.v[i], val.astype(cache.v[i].dtype), cache.index)
      cache = cache.replace(k=(*cache.k[:i], new_k, *cache.k[i + 1:]),
                            v=(*cache.v[:i], new_v, *cache.v[i + 1:]))
      key, val = c(new_k), c(new_v)  # [B, K, S, H]

    if cache is None:
      out = attention_lib.attend(q, key, val, key_mask, cfg.attention)
    elif cache.ragged is not None:
      out = decode_attention.attend(q, key, val, key_mask, query_slots, cache.ragged)
    else:
      out = attention_lib.dense(q, key, val, key_mask, query_slots)  # [B, T, N, H]
    out = out.reshape(b * t, n, h)
    return _project(out, c(wo), 2).reshape(b, t, d), cache


class MLP(nn.Module):
  config: Qwen2Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    gate = _param(self, "gate_proj", (d, f), ("embed", "mlp"), _dense_init, cfg)
    up = _param(self, "up_proj", (d, f), ("embed", "mlp"), _dense_init, cfg)
    down = _param(self, "down_proj", (f, d), ("mlp", "embed"), _dense_init, cfg)
    c = lambda w: _cast(w, cfg)
    rows = x.reshape(-1, d)
    hidden = nn.silu(_project(rows, c(gate), 1)) * _project(rows, c(up), 1)  # [B * T, F]
    hidden = nn.with_logical_constraint(hidden.reshape(*x.shape[:-1], f), (
        "activation_batch", "activation_length", "activation_mlp"))
    return _project(hidden.reshape(-1, f), c(down), 1).reshape(x.shape)


class DecoderLayer(nn.Module):
  config: Qwen2Config
  layer: int

  @nn.compact
  def __call__(self, x, positions, key_mask, query_slots, cache):
    cfg = self.config
    attn_out, cache = Attention(cfg, self.layer, name="self_attn")(
        RMSNorm(cfg, name="input_layernorm")(x), positions, key_mask, query_slots, cache)
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, cache


class Qwen2Backbone(nn.Module):
  """Embedding, decoder layers and final norm: tokens -> hidden states [B, T, D]."""

  config: Qwen2Config

  def setup(self):
    cfg = self.config
    self.embed_tokens = self.param(
        "embed_tokens", nn.with_logical_partitioning(_dense_init, ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
    layer_cls = DecoderLayer
    if cfg.remat_mode != "none":  # inside a scan, CSE cannot merge the recomputation away
      layer_cls = nn.remat(DecoderLayer, prevent_cse=not cfg.scan_layers,
                           policy=REMAT_POLICIES[cfg.remat_mode])
    if cfg.scan_layers:
      self.layers = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast,) * 4, length=cfg.num_hidden_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})(cfg, 0, name="layers")
    else:
      self.layers = [layer_cls(cfg, i, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg, name="norm")

  def __call__(self, tokens, positions, attention_mask, cache: KVCache | None = None):
    cfg = self.config
    x = _cast(self.embed_tokens[tokens], cfg)  # [B, T, D]; gather first, cast only the rows used
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    mask = attention_mask.astype(bool)
    t = tokens.shape[1]
    paged = isinstance(cache, paged_attention.PagedCache)
    if cache is None:
      key_mask, query_slots = mask, jnp.arange(t)
    elif paged:  # a row's keys are its positions 0 .. cache.lengths: no mask, no slots
      key_mask = query_slots = None
    else:
      key_mask = _write_slots(cache.mask, mask, cache.index)
      query_slots = cache.index[..., None] + jnp.arange(t)  # [T], or [B, T] for a per-row index
      cache = cache.replace(mask=key_mask)
    if cfg.scan_layers:
      if cache is not None:
        raise ValueError("a scanned model decodes through apply_with_cache (unrolled layers)")
      x, _ = self.layers(x, positions, key_mask, query_slots, None)
    else:
      for layer in self.layers:
        x, cache = layer(x, positions, key_mask, query_slots, cache)
    if cache is not None and not paged:  # the paged engine advances its rows' lengths itself
      cache = cache.replace(index=cache.index + t)
    return self.norm(x), cache

  def attend(self, hidden):
    """Tied output head: hidden [B, T, D] -> logits [B, T, V] in float32."""
    return jnp.einsum("BTD,VD->BTV", hidden, _cast(self.embed_tokens, self.config),
                      preferred_element_type=jnp.float32)


class Qwen2ForCausalLM(nn.Module):
  config: Qwen2Config

  def setup(self):
    cfg = self.config
    self.model = Qwen2Backbone(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
          _dense_init, ("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size),
                                jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens, positions, attention_mask, cache=None, *, return_hidden=False):
    hidden, cache = self.model(tokens, positions, attention_mask, cache)
    if return_hidden:
      return hidden, cache
    return self.logits(hidden), cache

  def logits(self, hidden):
    if self.config.tie_word_embeddings:
      return self.model.attend(hidden)
    return jnp.einsum("BTD,DV->BTV", hidden, _cast(self.lm_head, self.config),
                      preferred_element_type=jnp.float32)


class Qwen2Critic(nn.Module):
  """The same backbone with a scalar value head: tokens -> values [B, T] in float32."""

  config: Qwen2Config

  @nn.compact
  def __call__(self, tokens, positions, attention_mask):
    cfg = self.config
    hidden, _ = Qwen2Backbone(cfg, name="model")(tokens, positions, attention_mask)
    w = self.param("value_head", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                   (cfg.hidden_size,), jnp.dtype(cfg.param_dtype))
    b = self.param("value_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                   jnp.dtype(cfg.param_dtype))
    return (jnp.einsum("BTD,D->BT", hidden, _cast(w, cfg), preferred_element_type=jnp.float32)
            + b.astype(jnp.float32))


# --------------------------------------------------------------------------------------------------
# Functional entry points
# --------------------------------------------------------------------------------------------------


def positions_from_mask(attention_mask: Array) -> Array:
  """Position of each token counted over real tokens only; left padding gets position 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _default_mask(tokens, attention_mask):
  return jnp.ones_like(tokens, jnp.int32) if attention_mask is None else attention_mask


def forward(params: Params, tokens: Array, config: Qwen2Config, attention_mask: Array | None = None
            ) -> Array:
  """Full causal forward: tokens [B, T] int32 -> logits [B, T, V] float32."""
  mask = _default_mask(tokens, attention_mask)
  logits, _ = Qwen2ForCausalLM(config).apply(
      {"params": params}, tokens, positions_from_mask(mask), mask)
  return logits


def forward_hidden(params: Params, tokens: Array, config: Qwen2Config,
                   attention_mask: Array | None = None) -> Array:
  """Final-norm hidden states [B, T, D], for losses that project to the vocabulary in chunks."""
  mask = _default_mask(tokens, attention_mask)
  hidden, _ = Qwen2ForCausalLM(config).apply(
      {"params": params}, tokens, positions_from_mask(mask), mask, return_hidden=True)
  return hidden


def output_embedding(params: Params, config: Qwen2Config) -> Array:
  """The output projection as [D, V] (the transposed input embedding when tied)."""
  if config.tie_word_embeddings:
    return params["model"]["embed_tokens"].T
  return params["lm_head"]


def apply_with_cache(params: Params, tokens: Array, positions: Array, attention_mask: Array,
                     cache: KVCache, config: Qwen2Config) -> tuple[Array, KVCache]:
  """Prefill or decode: writes tokens [B, T] into slots cache.index..+T; logits [B, T, V] f32.

  A scanned model's stacked layers are read one slice per layer and decoded unrolled, as an
  unscanned model's are: the cache stays one buffer per layer (see KVCache)."""
  if config.scan_layers:
    params, config = unstack_layers(params), config.replace(scan_layers=False)
  return Qwen2ForCausalLM(config).apply({"params": params}, tokens, positions, attention_mask,
                                        cache)


def _is_stacked(params: Params) -> bool:
  return "layers" in params["model"]


def stack_layers(params: Params) -> Params:
  """Per-layer parameters (model/layers_i/...) -> the scanned layout (model/layers/..., [L, ...])."""
  model = params["model"]
  if _is_stacked(params):
    return params
  count = sum(1 for k in model if k.startswith("layers_"))
  layers = [model[f"layers_{i}"] for i in range(count)]
  rest = {k: v for k, v in model.items() if not k.startswith("layers_")}
  return {**params, "model": {**rest, "layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}}


def unstack_layers(params: Params) -> Params:
  """The scanned layout -> per-layer parameters; the inverse of `stack_layers`."""
  model = params["model"]
  if not _is_stacked(params):
    return params
  stacked = model["layers"]
  count = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in model.items() if k != "layers"}
  layers = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(count)}
  return {**params, "model": {**rest, **layers}}


def params_layout(params_or_paths) -> str:
  """"stacked" (scan_layers) or "per-layer", from a params pytree's model keys."""
  return "stacked" if _is_stacked(params_or_paths) else "per-layer"


def critic_values(params: Params, tokens: Array, config: Qwen2Config,
                  attention_mask: Array | None = None) -> Array:
  """Critic forward: values [B, T] float32."""
  mask = _default_mask(tokens, attention_mask)
  return Qwen2Critic(config).apply({"params": params}, tokens, positions_from_mask(mask), mask)


def _init(module, config, rng):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return module.init(rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))["params"]


# How each parameter (by its last name) is initialised; `_draw` refuses a name missing here.
_INIT_KIND = {**{name: "normal" for name in ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj",
                                              "o_proj", "gate_proj", "up_proj", "down_proj")},
              **{name: "zeros" for name in ("q_bias", "k_bias", "v_bias", "value_head",
                                             "value_bias")},
              "weight": "ones"}


def _draw(module, config: Qwen2Config, rng: Array) -> Params:
  """Flax's initialisers, but one random draw per parameter *kind* stacked over layers.

  XLA on CPU spends ~1 s compiling each separate threefry normal draw, so Flax's per-parameter
  init costs 10 s for a 2-layer model and minutes for 24 layers. Drawing [L, ...] once per kind
  with the `rbg` generator (a single XLA op, fast to compile and partitionable) keeps the
  distributions (normal(0.02) kernels, zero biases, unit norms) and stays pure and jittable.
  """
  shapes = jax.eval_shape(lambda r: nn.unbox(_init(module, config, r)), rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  rng = jax.random.wrap_key_data(  # any key (raw uint32 or typed) -> an rbg key, deterministically
      jax.random.bits(jax.random.wrap_key_data(rng.reshape(-1)[-2:]), (4,), jnp.uint32),
      impl="rbg")
  flat = flax.traverse_util.flatten_dict(shapes)
  groups: dict[tuple[str, ...], list] = {}
  for path in flat:
    kind = tuple("layers_*" if p.startswith("layers_") else p for p in path)
    groups.setdefault(kind, []).append(path)
  out = {}
  for i, (kind, paths) in enumerate(sorted(groups.items())):
    if kind[-1] not in _INIT_KIND:
      raise KeyError(f"no initialiser for parameter {'/'.join(kind)}; add it to _INIT_KIND")
    paths.sort(key=lambda p: [int(x[7:]) if x.startswith("layers_") else 0 for x in p])
    shape = (len(paths),) + flat[paths[0]].shape
    init = {"normal": lambda k, s: 0.02 * jax.random.normal(k, s, jnp.float32),
            "zeros": lambda k, s: jnp.zeros(s, jnp.float32),
            "ones": lambda k, s: jnp.ones(s, jnp.float32)}[_INIT_KIND[kind[-1]]]
    stacked = init(jax.random.fold_in(rng, i), shape)  # [L, ...] (L = 1 outside the layers)
    for j, path in enumerate(paths):
      out[path] = stacked[j].astype(flat[path].dtype)
  return flax.traverse_util.unflatten_dict(out)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: Qwen2Config, rng: Array) -> Params:
  """Random actor parameters (plain arrays, logical-axis boxes removed)."""
  return _draw(Qwen2ForCausalLM(config), config, rng)


@functools.partial(jax.jit, static_argnums=0)
def init_critic_params(config: Qwen2Config, rng: Array) -> Params:
  return _draw(Qwen2Critic(config), config, rng)


def critic_from_actor(actor_params: Params, config: Qwen2Config) -> Params:
  """A critic whose backbone is a copy of the actor's and whose value head starts at zero."""
  return {"model": jax.tree.map(jnp.copy, actor_params["model"]),
          "value_head": jnp.zeros((config.hidden_size,), jnp.dtype(config.param_dtype)),
          "value_bias": jnp.zeros((), jnp.dtype(config.param_dtype))}


def param_shapes(config: Qwen2Config, critic: bool = False) -> Any:
  """ShapeDtypeStructs of the actor's (or critic's) parameters; allocates nothing."""
  init = init_critic_params if critic else init_params
  return jax.eval_shape(init, config, jax.random.PRNGKey(0))


def logical_axes(config: Qwen2Config, critic: bool = False) -> Any:
  """PartitionSpecs of logical axis names, one per parameter, from shapes only (no allocation)."""
  module = Qwen2Critic(config) if critic else Qwen2ForCausalLM(config)
  boxed = jax.eval_shape(lambda r: _init(module, config, r), jax.random.key(0))
  return nn.get_partition_spec(boxed)
