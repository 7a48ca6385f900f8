"""Hugging Face safetensors <-> explore_jax parameter pytree, and orbax save/restore.

The whole mapping is `_hf_layout`: one entry per Hugging Face tensor name, giving the pytree path
and the reshape between the torch layout ([out, in] Linear weights, flat heads) and ours
([in, out] kernels, per-head projections). Only safetensors are read (never pickle) and nothing in a
checkpoint directory is executed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

from explore_jax.models.qwen2 import Qwen2Config

Params = dict[str, Any]


def _hf_layout(config: Qwen2Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...],
                                                        Callable, Callable]]:
  """HF name -> (pytree path, HF shape, to_jax(np) , to_hf(np))."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  ident = lambda x: x
  transpose = lambda x: np.ascontiguousarray(x.T)

  def heads_in(heads):  # [heads*H, D] -> [D, heads, H]
    return lambda x: np.ascontiguousarray(x.T).reshape(d, heads, h)

  def heads_in_back(heads):
    return lambda x: np.ascontiguousarray(x.reshape(d, heads * h).T)

  layout = {"model.embed_tokens.weight": (("model", "embed_tokens"), (v, d), ident, ident),
            "model.norm.weight": (("model", "norm", "weight"), (d,), ident, ident)}
  if not config.tie_word_embeddings:
    layout["lm_head.weight"] = (("lm_head",), (v, d), transpose, transpose)
  for i in range(config.num_hidden_layers):
    pre, path = f"model.layers.{i}.", ("model", f"layers_{i}")
    for name, heads in (("q", n), ("k", k), ("v", k)):
      layout[f"{pre}self_attn.{name}_proj.weight"] = (
          path + ("self_attn", f"{name}_proj"), (heads * h, d), heads_in(heads),
          heads_in_back(heads))
      layout[f"{pre}self_attn.{name}_proj.bias"] = (
          path + ("self_attn", f"{name}_bias"), (heads * h,),
          lambda x, heads=heads: x.reshape(heads, h), lambda x, heads=heads: x.reshape(heads * h))
    layout[pre + "self_attn.o_proj.weight"] = (
        path + ("self_attn", "o_proj"), (d, n * h),
        lambda x: np.ascontiguousarray(x.T).reshape(n, h, d),
        lambda x: np.ascontiguousarray(x.reshape(n * h, d).T))
    for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
      layout[f"{pre}mlp.{name}.weight"] = (path + ("mlp", name), shape, transpose, transpose)
    for name in ("input_layernorm", "post_attention_layernorm"):
      layout[f"{pre}{name}.weight"] = (path + (name, "weight"), (d,), ident, ident)
  return layout


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf_state(state: dict[str, np.ndarray], config: Qwen2Config) -> Params:
  """Convert an in-memory HF state dict (numpy arrays) into the params pytree."""
  params: Params = {}
  for name, (path, _, to_jax, _) in _hf_layout(config).items():
    _set_path(params, path, to_jax(np.asarray(state[name])))
  return params


def hf_state_from_params(params: Params, config: Qwen2Config) -> dict[str, np.ndarray]:
  return {name: to_hf(np.asarray(_get_path(params, path)))
          for name, (path, _, _, to_hf) in _hf_layout(config).items()}
