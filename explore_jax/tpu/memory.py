"""Analytic per-device memory of an RL run: what must fit in one chip's HBM, component by component.

A run goes through two phases on top of a resident train state:

  state    actor params (+ an optional float32 master copy) and AdamW mu, nu; the same for the
           critic (PPO); the frozen reference model when KL is on. Sharded like the parameters.
  update   gradients (+ an accumulator when the mini-batch is split into micro-batches), the
           activations of one micro-batch kept for the backward pass, and one chunk of logits.
  rollout  the KV cache of the sequences decoding together, the compute-dtype copy of the actor's
           weights that the sampler reads, one prefill layer's attention scores, the decode logits.

  peak = state + max(update, rollout)

Sizes per device come from the same logical-axis rules as the real arrays
(`explore_jax.tpu.sharding.DEFAULT_RULES`): a logical name maps to mesh axes by flax's priority rules
and a mesh axis that does not divide a dimension evenly is dropped (the dimension is replicated over
it), exactly as `sharding.logical_to_mesh` does. So parameters and optimizer states are divided by
up to fsdp * tensor, batches by up to data * fsdp, heads / MLP width / vocabulary by up to tensor.
The parameter and optimizer figures equal the shard sizes of the eval_shape'd arrays (tested); the
activation figures are estimates with these formulas (c = bytes of the compute dtype, b = sequences
of the micro-batch on one device, T = sequence length, L layers, N/K query/kv heads, H head dim,
D width, F MLP width, V vocabulary):

  one layer's residuals   S1 = (6 [b,T,D] + [b,T,(N+2K)H] + 6 [b,T,F]) * c    (x, norms, q, k, v,
                               + (13 + c) [b,N,T,T]         gate, up, silu, product; f32 scores,
                                                            exp, probs, bool mask, probs in c;
                                                            13 when c = 4)
  one layer's gradients   G1 = (2 [b,T,D] + [b,T,(N+2K)H] + 2 [b,T,F]) * c + (4 + c) [b,N,T,T]
  remat "full" (every decoder layer recomputed in the backward pass, `Qwen2Config.remat`):
      saved  = (L + 1) [b,T,D] * c + [b,T,D] * 4   (embedding and layer outputs, the final norm's
                                                    float32 input)
      working = S1 + G1                (one layer recomputed and differentiated at a time)
  remat "none": saved = L * S1 + the same (L + 1) [b,T,D] c + [b,T,D] 4 + the compute-dtype copies
    of the layer weights (when they are stored in another dtype); working = G1.
  flash_attention=True: the [b,N,T,T] terms become 4 [b,N,T] (f32 softmax statistics), no grads.
  (The `saved` figure matches `jax.ad_checkpoint.print_saved_residuals` of the model; tested.)
  logits: 2 * [b, chunk, V] * 4 (float32 logits of one chunk and their gradient).

Without flash attention the [b, N, T, T] scores dominate at 8K tokens: the current model
materialises them, so the plan says what a splash-attention kernel would save.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Sequence

import jax
import numpy as np

from explore_jax.models.qwen2 import CACHE_AXES, PRESETS, Qwen2Config
from explore_jax.rollout import sampling
from explore_jax.tpu.sharding import DEFAULT_RULES, MESH_AXES, with_default_rules

GiB = 2**30

# HBM per chip (one JAX device per chip: v4 and v5p join their two TensorCores into one device),
# from the public Cloud TPU system-architecture pages: v4 32 GiB HBM2, v5e 16 GiB HBM2,
# v5p 95 GiB HBM2e, v6e (Trillium) 32 GiB.
# The share of HBM a plan or a compiled program may use: XLA keeps the rest for scratch and
# fragmentation (the dry run, `fits` and `explore_jax.aot` all count with it).
USABLE = 0.9
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}

# Slice sizes in chips and the accelerator-type name of each (v4 / v5p count TensorCores, two per
# chip; v5e / v6e count chips).
SLICE_CHIPS = {"v4": (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
               "v5e": (1, 4, 8, 16, 32, 64, 128, 256),
               "v5p": (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
               "v6e": (1, 4, 8, 16, 32, 64, 128, 256)}
_CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
_TYPE_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}


def accelerator_type(chip: str, chips: int) -> str:
  """The `--accelerator-type` of a slice, e.g. ("v5p", 32) -> "v5p-64"."""
  return f"{_TYPE_PREFIX[chip]}-{chips * _CORES_PER_CHIP[chip]}"


def slice_of(accelerator: str) -> tuple[str, int] | None:
  """The inverse of `accelerator_type`: "v5p-64" -> ("v5p", 32) (also "v5e-16" for v5litepod);
  None for a name of no known chip or an odd core count."""
  prefix, _, count = accelerator.rpartition("-")
  chip = {**{p: c for c, p in _TYPE_PREFIX.items()}, "v5e": "v5e"}.get(prefix)
  if chip is None or not count.isdigit() or int(count) % _CORES_PER_CHIP[chip]:
    return None
  return chip, int(count) // _CORES_PER_CHIP[chip]


def _dtype_bytes(name: str) -> int:
  return int(np.dtype({"bfloat16": np.float16}.get(name, name)).itemsize)


# --------------------------------------------------------------------------------------------------
# Parameters: shapes and logical axes written from the architecture, independent of the model code
# --------------------------------------------------------------------------------------------------


def param_table(config: Qwen2Config, critic: bool = False
                ) -> list[tuple[str, tuple[int, ...], tuple[str | None, ...]]]:
  """(name, shape, logical axes) of every parameter of the actor (or critic)."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  table = [("embed_tokens", (v, d), ("vocab", "embed"))]
  for i in range(config.num_hidden_layers):
    table += [
        (f"layers_{i}.q_proj", (d, n, h), ("embed", "q_heads", "head_dim")),
        (f"layers_{i}.q_bias", (n, h), ("q_heads", "head_dim")),
        (f"layers_{i}.k_proj", (d, k, h), ("embed", "kv_heads", "head_dim")),
        (f"layers_{i}.k_bias", (k, h), ("kv_heads", "head_dim")),
        (f"layers_{i}.v_proj", (d, k, h), ("embed", "kv_heads", "head_dim")),
        (f"layers_{i}.v_bias", (k, h), ("kv_heads", "head_dim")),
        (f"layers_{i}.o_proj", (n, h, d), ("q_heads", "head_dim", "embed")),
        (f"layers_{i}.gate_proj", (d, f), ("embed", "mlp")),
        (f"layers_{i}.up_proj", (d, f), ("embed", "mlp")),
        (f"layers_{i}.down_proj", (f, d), ("mlp", "embed")),
        (f"layers_{i}.input_layernorm", (d,), ("norm",)),
        (f"layers_{i}.post_attention_layernorm", (d,), ("norm",)),
    ]
  table.append(("norm", (d,), ("norm",)))
  if critic:
    table += [("value_head", (d,), ("embed",)), ("value_bias", (), ())]
  elif not config.tie_word_embeddings:
    table.append(("lm_head", (d, v), ("embed", "vocab")))
  return table


def param_count(config: Qwen2Config, critic: bool = False) -> int:
  return sum(math.prod(shape) for _, shape, _ in param_table(config, critic))


def mesh_axes_of(names: Sequence[str | None], rules=DEFAULT_RULES) -> list[tuple[str, ...]]:
  """Mesh axes of each dimension, by flax's rule priority (a mesh axis is used once per array)."""
  result: list[Any] = [None] * len(names)
  assigned = [False] * len(names)
  used: set[str] = set()
  for logical, mesh in rules:
    if logical not in names:
      continue
    pos = list(names).index(logical)
    axes = () if mesh is None else (mesh,) if isinstance(mesh, str) else tuple(mesh)
    if assigned[pos] or used & set(axes):
      continue
    result[pos], assigned[pos] = axes, True
    used |= set(axes)
  return [() if r is None else r for r in result]


def shard_shape(shape: Sequence[int], names: Sequence[str | None], mesh_shape: Sequence[int],
                rules=DEFAULT_RULES) -> tuple[int, ...]:
  """Per-device shape: mesh axes that do not divide a dimension evenly are dropped from it."""
  sizes = dict(zip(MESH_AXES, mesh_shape))
  out = []
  for dim, axes in zip(shape, mesh_axes_of(names, rules) + [()] * (len(shape) - len(names))):
    split = 1
    for axis in axes:
      if dim % (split * sizes[axis]) == 0:
        split *= sizes[axis]
    out.append(dim // split)
  return tuple(out)


def sharded_param_count(config: Qwen2Config, mesh_shape: Sequence[int], critic: bool = False,
                        rules=DEFAULT_RULES) -> int:
  """Parameters held by one device (the largest shard; shards of one array have equal sizes)."""
  return sum(math.prod(shard_shape(shape, names, mesh_shape, rules))
             for _, shape, names in param_table(config, critic))


def measured_bytes(shapes: Any, shardings: Any) -> int:
  """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs under matching shardings.

  For the trainer's dry run: `measured_bytes(jax.eval_shape(init, rng), state_shardings)`.
  """
  leaves = jax.tree.leaves(shapes)
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  if len(leaves) != len(specs):
    raise ValueError(f"{len(leaves)} arrays but {len(specs)} shardings")
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, specs))


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


class _Ledger:
  """A plan's components: bytes per device, the phase each lives in, and how far the mesh divides
  it (global elements over per-device elements)."""

  def __init__(self, mesh_shape: tuple[int, ...], rules):
    self.comps: dict[str, dict] = {}
    self.mesh_shape, self.rules = mesh_shape, rules

  def add(self, name: str, elements_global: int, elements_device: int, nbytes: float,
          phase: str) -> None:
    self.comps[name] = {"bytes": int(elements_device * nbytes), "phase": phase,
                        "divisor": round(elements_global / max(elements_device, 1), 2)}

  def act(self, shape, names) -> tuple[int, int]:
    """(global elements, per-device elements) of one activation."""
    return math.prod(shape), math.prod(shard_shape(shape, names, self.mesh_shape, self.rules))


def _state_components(ledger: _Ledger, cfg: Qwen2Config, algorithm: str, *, param_dtype: str,
                      master_dtype: str | None, opt_dtype: str, nu_dtype: str, grad_dtype: str,
                      grad_accum: bool, reference: bool, reference_dtype: str) -> dict:
  """Params, AdamW moments and gradients of the actor (and PPO's critic), the reference policy;
  returns the parameter counts."""
  mesh_shape, rules = ledger.mesh_shape, ledger.rules
  models = [("actor", False)] + ([("critic", True)] if algorithm == "ppo" else [])
  counts = {}
  for who, critic in models:
    total, local = param_count(cfg, critic), sharded_param_count(cfg, mesh_shape, critic, rules)
    counts[who] = total
    ledger.add(f"{who}_params", total, local, _dtype_bytes(param_dtype), "state")
    if master_dtype:
      ledger.add(f"{who}_master", total, local, _dtype_bytes(master_dtype), "state")
    ledger.add(f"{who}_adamw_mu_nu", total, local,
               _dtype_bytes(opt_dtype) + _dtype_bytes(nu_dtype), "state")
    ledger.add(f"{who}_grads", total, local, _dtype_bytes(grad_dtype), "update")
    if grad_accum:
      ledger.add(f"{who}_grad_accum", total, local, _dtype_bytes(grad_dtype), "update")
  if reference:
    ledger.add("reference_params", counts["actor"],
               sharded_param_count(cfg, mesh_shape, False, rules), _dtype_bytes(reference_dtype),
               "state")
  return counts


def _activation_components(ledger: _Ledger, cfg: Qwen2Config, b: int, T: int, c: int, *,
                           flash_attention: bool, remat: str, param_dtype: str,
                           compute_dtype: str, logits_chunk: int) -> None:
  """Activations of one micro-batch of b sequences of T tokens (formulas: module docstring)."""
  act = ledger.act
  L, D, F, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  btd = act((b, T, D), ("activation_batch", "activation_length", "activation_embed"))[1]
  btf = act((b, T, F), ("activation_batch", "activation_length", "activation_mlp"))[1]
  btqkv = act((b, T, (N + 2 * K) * H), ("activation_batch", "activation_length", None))[1]
  if flash_attention:  # only the f32 softmax statistics [b, N, T] are kept
    bntt = act((b, N, T), ("activation_batch", "activation_heads", None))[1]
    score_saved, score_grad = 4, 0
  else:  # f32 masked scores, exp, probs and the bool mask (+ the probs cast to c)
    bntt = act((b, N, T, T), ("activation_batch", "activation_heads", None, None))[1]
    score_saved, score_grad = 13 + (c if c < 4 else 0), 4 + c
  layer_saved = (6 * btd + btqkv + 6 * btf) * c + score_saved * bntt
  layer_grads = (2 * btd + btqkv + 2 * btf) * c + score_grad * bntt
  # The embedding output and every layer's output in c, the final norm's float32 input.
  backbone_saved = (L + 1) * btd * c + btd * 4
  if remat == "full":
    saved, working = backbone_saved, layer_saved + layer_grads
  else:
    # Without remat the compute-dtype copies of the layer weights are residuals too.
    casts = 0
    if param_dtype != compute_dtype:
      layer_local = sum(math.prod(shard_shape(shape, names, ledger.mesh_shape, ledger.rules))
                        for name, shape, names in param_table(cfg) if name.startswith("layers_"))
      casts = layer_local * c
    saved, working = L * layer_saved + backbone_saved + casts, layer_grads
  batch_div = round(math.prod((b, T, D)) / btd, 2)
  ledger.comps["saved_activations"] = {"bytes": int(saved), "phase": "update",
                                       "divisor": batch_div}
  ledger.comps["layer_working_set"] = {"bytes": int(working), "phase": "update",
                                       "divisor": batch_div}
  logits = act((b, min(logits_chunk, T), V), ("activation_batch", "activation_length",
                                              "activation_vocab"))
  ledger.add("logits_chunk", *logits, 2 * 4, "update")


def _rollout_components(ledger: _Ledger, cfg: Qwen2Config, B: int, S: int, prompt_len: int,
                        c: int, *, kv_pages: tuple[int, int] | None, kv_dtype: str,
                        flash_attention: bool, weights: tuple[int, int] | None) -> None:
  """The rollout of B rows of S positions: the KV cache (L layers of [B, K, S, H], keys and
  values; or the paged engine's pool), the sampler's weight copy (`weights`: global and
  per-device parameter counts, when the compute dtype differs), prefill scores, decode logits."""
  act, kv_bytes = ledger.act, 2 * _dtype_bytes(kv_dtype)
  L, V = cfg.num_hidden_layers, cfg.vocab_size
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  kv = act(kv_pages[:1] + (K, kv_pages[1], H) if kv_pages else (B, K, S, H), CACHE_AXES)
  ledger.add("kv_cache", L * kv[0], L * kv[1], kv_bytes, "rollout")
  # A decode chunk (or a static segment) attending a view of the cache holds a copy of it: at
  # most the largest segment end short of the whole cache (P + 3N/4 slots at 4 segments).
  ends = sampling._segment_ends(S - prompt_len, sampling.SEGMENTS) if S > prompt_len else []
  view = prompt_len + (ends[-2] if len(ends) > 1 else S - prompt_len)
  if view < S and not kv_pages:
    copy = act((B, K, view, H), CACHE_AXES)
    ledger.add("decode_view_copy", L * copy[0], L * copy[1], kv_bytes, "rollout")
  if weights:
    ledger.add("rollout_weights", *weights, c, "rollout")
  if flash_attention:
    pre = act((B, N, prompt_len), ("activation_batch", "activation_heads", None))
  else:
    pre = act((B, N, prompt_len, prompt_len), ("activation_batch", "activation_heads", None, None))
  ledger.add("prefill_scores", *pre, 4 + c, "rollout")
  ledger.add("decode_logits", *act((B, V), ("activation_batch", "activation_vocab")), 4, "rollout")


def plan(config: Qwen2Config, *, mesh_shape: Sequence[int], algorithm: str = "grpo",
         param_dtype: str = "float32", compute_dtype: str = "bfloat16",
         opt_dtype: str = "float32", nu_dtype: str | None = None,
         master_dtype: str | None = None,
         grad_dtype: str | None = None, grad_accum: bool = True,
         micro_batch: int, seq_len: int, remat: str = "full", flash_attention: bool = False,
         logits_chunk: int = 1024, reference: bool = False, reference_dtype: str = "bfloat16",
         rollout_batch: int = 0, rollout_len: int | None = None, prompt_len: int = 1024,
         kv_dtype: str = "bfloat16", kv_pages: tuple[int, int] | None = None,
         rules=DEFAULT_RULES) -> dict:
  """Bytes per device of every component of an RL run on a (data, fsdp, tensor) mesh.

  To match a trainer's state exactly, pass its dtypes: `param_dtype` of the params, `opt_dtype`
  of AdamW's mu (optax `mu_dtype`) and `nu_dtype` of nu (optax: the parameter dtype).
  `micro_batch` and `rollout_batch` are GLOBAL sequence counts (one forward/backward micro-step;
  sequences decoding together); each device holds its share along data * fsdp. `kv_pages`
  (pages, page size): the paged engine's pool instead of rollout_batch contiguous rows (split
  like them; no view is copied). Returns
  {"components": {name: {"bytes", "divisor", "phase"}}, "totals": {phase: bytes, "peak": bytes},
   "param_count": {...}, "bytes_per_param": ..., "per_device_micro_batch": ..., ...}.
  """
  if algorithm not in ("grpo", "ppo"):
    raise ValueError(f"algorithm={algorithm!r}: use 'grpo' or 'ppo'")
  if remat not in ("full", "none"):
    raise ValueError(f"remat={remat!r}: use 'full' or 'none'")
  if len(mesh_shape) != 3 or min(mesh_shape) < 1:
    raise ValueError(f"mesh_shape={tuple(mesh_shape)}: need positive (data, fsdp, tensor)")
  mesh_shape = tuple(int(m) for m in mesh_shape)
  grad_dtype = grad_dtype or param_dtype
  nu_dtype = nu_dtype or opt_dtype  # optax.adamw keeps nu in the parameter dtype: pass it here
  rollout_len = seq_len if rollout_len is None else rollout_len
  c = _dtype_bytes(compute_dtype)
  ledger = _Ledger(mesh_shape, rules)
  counts = _state_components(ledger, config, algorithm, param_dtype=param_dtype,
                             master_dtype=master_dtype, opt_dtype=opt_dtype, nu_dtype=nu_dtype,
                             grad_dtype=grad_dtype, grad_accum=grad_accum, reference=reference,
                             reference_dtype=reference_dtype)
  b = micro_batch
  _activation_components(ledger, config, b, seq_len, c, flash_attention=flash_attention,
                         remat=remat, param_dtype=param_dtype, compute_dtype=compute_dtype,
                         logits_chunk=logits_chunk)
  if rollout_batch:
    weights = (counts["actor"], sharded_param_count(config, mesh_shape, False, rules))
    _rollout_components(ledger, config, rollout_batch, rollout_len, prompt_len, c,
                        kv_pages=kv_pages, kv_dtype=kv_dtype, flash_attention=flash_attention,
                        weights=weights if param_dtype != compute_dtype else None)
  comps = ledger.comps
  totals = {p: sum(v["bytes"] for v in comps.values() if v["phase"] == p)
            for p in ("state", "update", "rollout")}
  totals["peak"] = totals["state"] + max(totals["update"], totals["rollout"])
  per_param = (_dtype_bytes(param_dtype) + (_dtype_bytes(master_dtype) if master_dtype else 0)
               + _dtype_bytes(opt_dtype) + _dtype_bytes(nu_dtype)
               + _dtype_bytes(grad_dtype) * (1 + grad_accum))
  return {"components": comps, "totals": totals, "param_count": counts,
          "bytes_per_param": per_param, "mesh_shape": mesh_shape, "algorithm": algorithm,
          "per_device_micro_batch": shard_shape((b,), ("activation_batch",), mesh_shape, rules)[0],
          "per_device_rollout_batch": shard_shape((rollout_batch,), ("cache_batch",), mesh_shape,
                                                  rules)[0]}


def fits(p: dict, chip: str, headroom: float = USABLE) -> bool:
  """Peak within `headroom` of the chip's HBM (XLA keeps the rest for scratch and fragmentation)."""
  return p["totals"]["peak"] <= headroom * HBM_BYTES[chip]


def smallest_slice(config: Qwen2Config, chip: str, *, seqs_per_device: int = 1,
                   rollout_seqs_per_device: int = 16, mini_batch: int = 256,
                   tensor_options: Sequence[int] = (1, 2, 4, 8), headroom: float = 0.9, **plan_kw):
  """The fewest chips (and the mesh) on which the plan fits, or None.

  The mesh is (1, chips / tensor, tensor): FSDP first, since the state dominates. Each batch shard
  holds `seqs_per_device` sequences per micro-step and `rollout_seqs_per_device` in the rollout.
  """
  for chips in SLICE_CHIPS[chip]:
    best = None
    for t in tensor_options:
      if chips % t:
        continue
      mesh = (1, chips // t, t)
      micro = seqs_per_device * chips // t
      if micro > mini_batch or mini_batch % micro:
        continue
      p = plan(config, mesh_shape=mesh, micro_batch=micro,
               rollout_batch=rollout_seqs_per_device * chips // t, **plan_kw)
      if fits(p, chip, headroom) and (best is None or
                                      p["totals"]["peak"] < best[1]["totals"]["peak"]):
        best = (mesh, p)
    if best:
      return chips, best[0], best[1]
  return None


def micro_batch_rows(rl, mesh_shape: Sequence[int]) -> int:
  """Global sequences per micro-step of a trainer config's `rl` block on a (data, fsdp, tensor)
  mesh: `rl.micro_batch_per_shard` x data x fsdp, or `rl.micro_batch_size` (global), exactly one
  of them set. A global count that does not split over the batch shards is refused: the batch
  axis would be replicated, every device holding the whole micro-batch."""
  shards = int(mesh_shape[0]) * int(mesh_shape[1])
  per_shard, size = rl.micro_batch_per_shard, rl.micro_batch_size
  if (per_shard > 0) == (size > 0) or per_shard < 0 or size < 0:
    raise ValueError(f"config: set exactly one of rl.micro_batch_per_shard (sequences per batch "
                     f"shard) and rl.micro_batch_size (global), the other 0; have "
                     f"micro_batch_per_shard={per_shard}, micro_batch_size={size}")
  if per_shard:
    return per_shard * shards
  if size % shards:
    raise ValueError(
        f"config: rl.micro_batch_size={size} (global) does not split over the {shards} batch "
        f"shards of mesh (data, fsdp, tensor) = {tuple(mesh_shape)} (data x fsdp = {shards}): "
        f"use a multiple of {shards}, or rl.micro_batch_size=0 with rl.micro_batch_per_shard=N "
        f"(N x {shards} sequences per micro-step)")
  return size


def describe_micro_batch(rl, mesh_shape: Sequence[int]) -> str:
  """The micro-batch of a config on a mesh, in words, for error messages."""
  shards = int(mesh_shape[0]) * int(mesh_shape[1])
  rows = micro_batch_rows(rl, mesh_shape)
  key = (f"rl.micro_batch_per_shard={rl.micro_batch_per_shard}" if rl.micro_batch_per_shard
         else f"rl.micro_batch_size={rl.micro_batch_size}")
  return f"{key}: {rows} sequences = {rows // shards} per batch shard x {shards} shards"


def plan_for_config(config, model_config: Qwen2Config, mesh_shape: Sequence[int]) -> dict:
  """The plan of a trainer config (`configs/*.py`) on a resolved (data, fsdp, tensor) mesh.

  Reads the trainer's own settings, so its numbers line up with `--config.dry_run`: the trainer's
  AdamW keeps mu in float32 and nu in the parameter dtype; the rollout decodes `rollout.slots`
  rows at a time (continuous and paged engines; the paged one's KV cache is its pool of
  `rollout.kv_pages` pages) or one wave of `rollout.prompts_per_wave` prompts (static).
  """
  rl = config.rl
  rows = (config.rollout.prompts_per_wave or config.data.prompts_per_step) * config.rollout.n
  if config.rollout.engine in ("continuous", "paged"):
    rows = config.rollout.slots or config.data.prompts_per_step * config.rollout.n
  kv_pages = None
  if config.rollout.engine == "paged":
    r = config.rollout
    full = -(-(config.data.max_prompt_len + r.max_new_tokens) // r.page_size)
    kv_pages = (r.kv_pages or rows * (full + -(-config.data.max_prompt_len // r.page_size)),
                r.page_size)
  rules = with_default_rules(config.mesh.rules)
  return plan(model_config, mesh_shape=mesh_shape, algorithm=rl.algorithm,
              param_dtype=model_config.param_dtype, compute_dtype=model_config.dtype,
              opt_dtype="float32", nu_dtype=model_config.param_dtype,
              micro_batch=micro_batch_rows(rl, mesh_shape),
              grad_accum=micro_batch_rows(rl, mesh_shape) < rl.mini_batch_size,
              seq_len=config.data.max_prompt_len + config.rollout.max_new_tokens,
              remat="full" if model_config.remat else "none", logits_chunk=rl.logit_chunk,
              reference=bool(rl.kl_coef), reference_dtype=model_config.param_dtype,
              rollout_batch=rows, prompt_len=config.data.max_prompt_len,
              kv_dtype=model_config.dtype, kv_pages=kv_pages, rules=rules)


def print_plan_for_config(config, model_config: Qwen2Config, mesh_shape: Sequence[int]) -> dict:
  """Print `plan_for_config` as a table; returns the plan."""
  p = plan_for_config(config, model_config, mesh_shape)
  print(f"analytic plan (explore_jax.tpu.memory), mesh {tuple(mesh_shape)}; *_params and "
        "*_adamw_mu_nu equal the measured state less AdamW's step counters:")
  print(format_plan(p, unit="MiB"))
  return p


def format_plan(p: dict, chip: str | None = None, unit: str = "GiB") -> str:
  scale = {"GiB": GiB, "MiB": 2**20}[unit]
  rows = [f"{'component':<22}{'phase':<9}{'divisor':>9}{unit + '/device':>12}"]
  for name, v in p["components"].items():
    rows.append(f"{name:<22}{v['phase']:<9}{v['divisor']:>9g}{v['bytes'] / scale:>12.2f}")
  for name, v in p["totals"].items():
    rows.append(f"{'total ' + name:<40}{v / scale:>12.2f}")
  if chip:
    verdict = "fits" if fits(p, chip) else "does NOT fit"
    rows.append(f"{chip}: {HBM_BYTES[chip] / GiB:g} GiB HBM per chip -> {verdict} (90% usable)")
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(prog="python -m explore_jax.tpu.memory",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="qwen2.5-7b", choices=sorted(PRESETS))
  ap.add_argument("--mesh", default="1,4,4", help="data,fsdp,tensor (one -1 = --chips / rest)")
  ap.add_argument("--chips", type=int, default=None, help="devices, to resolve a -1 in --mesh")
  ap.add_argument("--chip", choices=sorted(HBM_BYTES), default=None)
  ap.add_argument("--find_slice", default=None,
                  help="chips, e.g. v4,v5e,v5p: print the smallest slice of each")
  ap.add_argument("--algorithm", choices=("grpo", "ppo"), default="grpo")
  ap.add_argument("--param_dtype", default="float32")
  ap.add_argument("--compute_dtype", default="bfloat16")
  ap.add_argument("--opt_dtype", default="float32", help="AdamW mu (and nu unless --nu_dtype)")
  ap.add_argument("--nu_dtype", default=None)
  ap.add_argument("--master_dtype", default=None)
  ap.add_argument("--grad_dtype", default=None)
  ap.add_argument("--seq_len", type=int, default=9216)
  ap.add_argument("--prompt_len", type=int, default=1024)
  ap.add_argument("--micro_batch", type=int, default=None, help="global; default 1 per batch shard")
  ap.add_argument("--rollout_batch", type=int, default=None, help="global; default 16 per shard")
  ap.add_argument("--logits_chunk", type=int, default=1024)
  ap.add_argument("--remat", choices=("full", "none"), default="full")
  ap.add_argument("--flash_attention", action="store_true")
  ap.add_argument("--reference", action="store_true")
  a = ap.parse_args(argv)
  config = PRESETS[a.preset]
  kw = dict(algorithm=a.algorithm, param_dtype=a.param_dtype, compute_dtype=a.compute_dtype,
            opt_dtype=a.opt_dtype, nu_dtype=a.nu_dtype, master_dtype=a.master_dtype,
            grad_dtype=a.grad_dtype,
            seq_len=a.seq_len, prompt_len=a.prompt_len, logits_chunk=a.logits_chunk,
            remat=a.remat, flash_attention=a.flash_attention, reference=a.reference)
  if a.find_slice:
    print("| chip | HBM/chip | smallest slice | chips | mesh (data,fsdp,tensor) | peak GiB/chip |")
    print("|---|---|---|---|---|---|")
    chips = a.find_slice.split(",")
    unknown = sorted(set(chips) - set(HBM_BYTES))
    if unknown:
      ap.error(f"--find_slice: unknown chip(s) {unknown}; known: {sorted(HBM_BYTES)}")
    for chip in chips:
      found = smallest_slice(config, chip, **kw)
      if found is None:
        print(f"| {chip} | {HBM_BYTES[chip] / GiB:g} GiB | none up to {SLICE_CHIPS[chip][-1]} chips"
              " | | | |")
        continue
      chips, mesh, p = found
      print(f"| {chip} | {HBM_BYTES[chip] / GiB:g} GiB | {accelerator_type(chip, chips)} | {chips} "
            f"| {mesh} | {p['totals']['peak'] / GiB:.1f} |")
    return
  mesh = [int(m) for m in a.mesh.split(",")]
  if -1 in mesh:
    if a.chips is None:
      sys.exit(f"--mesh {a.mesh} has -1: give --chips")
    mesh[mesh.index(-1)] = a.chips // -math.prod(mesh)
  shards = mesh[0] * mesh[1]
  p = plan(config, mesh_shape=mesh, micro_batch=a.micro_batch or shards,
           rollout_batch=a.rollout_batch if a.rollout_batch is not None else 16 * shards, **kw)
  print(f"{a.preset} {a.algorithm} mesh={tuple(mesh)} seq_len={a.seq_len} "
        f"params actor={p['param_count']['actor']:,}"
        + (f" critic={p['param_count']['critic']:,}" if "critic" in p["param_count"] else "")
        + f", {p['bytes_per_param']} bytes/param for params+opt+grads")
  print(format_plan(p, a.chip))


if __name__ == "__main__":
  main()
