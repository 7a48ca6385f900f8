"""Causal self-attention over left-padded rows with grouped kv heads, in several implementations.

Letters as in `qwen2`: B batch, T query length, S key length, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim.

One semantics for every implementation: the query in slot q attends to the keys in slots s <= q
whose `key_mask` is set; query head n reads kv head n // G. Outputs are defined at the slots whose
mask is set (a padding slot's output is finite and never read by a real token: every real query
masks it out as a key).

    dense      [T, S] scores per head, softmax, product. Any query slots (the sampler's cache).
    blockwise  flash attention in pure JAX: an online softmax over key blocks of BLOCK slots, one
               query block at a time, with a custom VJP whose backward recomputes each block's
               scores from the saved log-sum-exp. Neither pass holds more than a [BLOCK, BLOCK]
               score tile per head, and key blocks above the diagonal are never visited.
    splash     Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
               causal mask, padding as segment 0 and real tokens as segment 1, run per device in a
               `shard_map` over the batch and kv-head axes. Off TPU it runs in interpret mode.
    cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on a
               GPU, bf16/fp16 only. It takes padding only as sequence lengths, so each row is
               rolled left over its leading padding first and rolled back after; this assumes a
               row's real tokens are contiguous (left padding, then tokens, then right padding),
               which is how the sampler and the trainer lay rows out.
    auto       see `resolve`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "splash", "cudnn")
BLOCK = 256  # blockwise: query and key block (slots); 256 ran faster than 512 on CPU
SPLASH_BLOCK = 128  # splash: the kernel's tile; lengths are padded to a multiple of it
# Up to this length `auto` keeps dense attention off TPU/cuDNN: at 128 slots the two ran equally
# fast on CPU, from 256 on blockwise was 2x faster (benchmarks/attention.py), and short rows (the
# CPU demo's) then keep their exact former numerics.
DENSE_MAX_LEN = 128
_NEG = -0.7 * float(np.finfo(np.float32).max)  # masked score: exp(_NEG - m) == 0, no inf - inf


def check(name: str) -> None:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention={name!r}: use one of {IMPLEMENTATIONS}")


def _platform() -> str:
  """The platform the computation is compiled for: the mesh's devices when a mesh is set (an
  ahead-of-time compile for TPU on a CPU host sets a TPU mesh), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    try:
      return mesh.abstract_device.platform
    except Exception:  # a mesh without device information
      pass
  return jax.default_backend()


def resolve(name: str, length: int, head_dim: int, dtype) -> str:
  """The implementation `name` stands for at this length, head dim and compute dtype.

  `auto`: on TPU, splash where the head dim is a multiple of 128 (its kernel's lane width); on a
  GPU in bf16/fp16, cuDNN; otherwise dense up to DENSE_MAX_LEN slots and blockwise beyond, which
  on CPU was both faster (0.3-0.5x dense's time from 256 slots on) and linear in memory.
  """
  check(name)
  if name != "auto":
    return name
  platform = _platform()
  if platform == "tpu" and head_dim % 128 == 0:
    return "splash"
  if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
      and head_dim <= 128:
    return "cudnn"
  return "dense" if length <= DENSE_MAX_LEN else "blockwise"


def length_multiple(name: str, head_dim: int, dtype) -> int:
  """What a static sequence length (e.g. `rl.length_buckets`) should be a multiple of: splash's
  block when `name` resolves to splash (other lengths are padded up to it inside, wasting the
  padding's compute), else 8."""
  return SPLASH_BLOCK if resolve(name, 1 << 20, head_dim, dtype) == "splash" else 8


def attend(q: Array, k: Array, v: Array, key_mask: Array, implementation: str) -> Array:
  """Causal self-attention over a full (uncached) sequence.

  q [B, T, N, H] (rotated), k and v [B, K, T, H], key_mask [B, T] bool -> [B, T, N, H]."""
  impl = resolve(implementation, q.shape[1], q.shape[-1], q.dtype)
  if impl == "dense":
    return dense(q, k, v, key_mask, jnp.arange(q.shape[1]))
  if impl == "blockwise":
    return blockwise(q, k, v, key_mask)
  if impl == "splash":
    return splash(q, k, v, key_mask)
  return cudnn(q, k, v, key_mask)


# --------------------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------------------


def dense(q: Array, k: Array, v: Array, key_mask: Array, query_slots: Array) -> Array:
  """q [B, T, N, H], k and v [B, K, S, H], key_mask [B, S], query_slots [T] (or [B, T]: rows of
  the rollout engine sit at different positions) -> [B, T, N, H]."""
  b, t, n, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  g = n // kh
  # Heads first, so that both products are plain batched matmuls over [B, K] (the G query heads
  # of a kv head share its keys): [B, K, G*T, H] x [B, K, S, H]. XLA:CPU runs these, and their
  # gradients, faster than the same einsum over [B, T, K, G, H].
  q = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
  scores = jnp.einsum("BKQH,BKSH->BKQS", q, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kh, g, t, s) / jnp.sqrt(jnp.float32(h))
  query_slots = jnp.broadcast_to(query_slots, (b, t))
  allowed = key_mask[:, None, :] & (jnp.arange(s)[None, None, :] <= query_slots[:, :, None])
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)  # [B,K,G,T,S]
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kh, g * t, s)
  out = jnp.matmul(probs, v)  # [B, K, G*T, H]
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# --------------------------------------------------------------------------------------------------
# blockwise (flash attention in pure JAX)
# --------------------------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_len(x: Array, axis: int, length: int) -> Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad)


def blockwise(q: Array, k: Array, v: Array, key_mask: Array, block: int | None = None) -> Array:
  """Same contract as `attend`; see the module docstring. `block`: BLOCK when None."""
  b, t, n, h = q.shape
  kh = k.shape[1]
  g = n // kh
  blk = min(block or BLOCK, _round_up(t, 8))
  tp = _round_up(t, blk)  # padded slots are masked keys; their query rows are dropped
  q = (q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).reshape(b, t, kh, g, h)
  q = _pad_len(q.transpose(0, 2, 3, 1, 4), 3, tp)  # [B, K, G, Tp, H]
  out = _flash(q, _pad_len(k, 2, tp), _pad_len(v, 2, tp), _pad_len(key_mask, 1, tp), blk)
  return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _tile_scores(qi, kj, mj, i, j, blk):
  """Masked scores of query block i against key block j: [B, K, G, blk, blk] float32."""
  b, kh, g = qi.shape[:3]
  s = jnp.einsum("BKQH,BKSH->BKQS", qi.reshape(b, kh, g * blk, -1), kj,
                 preferred_element_type=jnp.float32).reshape(b, kh, g, blk, blk)
  qpos = i * blk + jnp.arange(blk)
  kpos = j * blk + jnp.arange(blk)
  allowed = mj[:, None, None, None, :] & (kpos[None, :] <= qpos[:, None])
  return jnp.where(allowed, s, _NEG)


def _blocks(x, axis, j, blk):
  return jax.lax.dynamic_slice_in_dim(x, j * blk, blk, axis=axis)


def _flash_forward(q, k, v, mask, blk):
  """q [B, K, G, T, H] (pre-scaled), k, v [B, K, T, H], mask [B, T] -> out, lse [B, K, G, T]."""
  b, kh, g, t, h = q.shape

  def query_block(i):
    qi = _blocks(q, 3, i, blk)  # [B, K, G, blk, H]

    def key_block(j, carry):
      m, l, acc = carry
      s = _tile_scores(qi, _blocks(k, 2, j, blk), _blocks(mask, 1, j, blk), i, j, blk)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("BKQS,BKSH->BKQH", p.astype(v.dtype).reshape(b, kh, g * blk, blk),
                      _blocks(v, 2, j, blk), preferred_element_type=jnp.float32)
      acc = acc * corr[..., None] + pv.reshape(b, kh, g, blk, h)
      return m_new, l * corr + jnp.sum(p, axis=-1), acc

    init = (jnp.full((b, kh, g, blk), _NEG, jnp.float32), jnp.zeros((b, kh, g, blk), jnp.float32),
            jnp.zeros((b, kh, g, blk, h), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)  # causal: key blocks 0..i only
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

  out, lse = jax.lax.map(query_block, jnp.arange(t // blk))  # [nb, B, K, G, blk, ...]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, t, h)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, t)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, mask, blk):
  return _flash_forward(q, k, v, mask, blk)[0]


def _flash_fwd(q, k, v, mask, blk):
  out, lse = _flash_forward(q, k, v, mask, blk)
  return out, (q, k, v, mask, out, lse)


def _flash_bwd(blk, res, dout):
  q, k, v, mask, out, lse = res
  b, kh, g, t, h = q.shape
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]
  flat = lambda x: x.reshape(b, kh, g * blk, -1)

  def query_block(i, carry):
    dq, dk, dv = carry
    qi, doi = _blocks(q, 3, i, blk), _blocks(dout, 3, i, blk)
    lse_i, delta_i = _blocks(lse, 3, i, blk), _blocks(delta, 3, i, blk)

    def key_block(j, carry):
      dqi, dk, dv = carry
      kj, vj = _blocks(k, 2, j, blk), _blocks(v, 2, j, blk)
      s = _tile_scores(qi, kj, _blocks(mask, 1, j, blk), i, j, blk)
      p = jnp.exp(s - lse_i[..., None])  # the forward's probabilities, recomputed
      dv_j = jnp.einsum("BKQS,BKQH->BKSH", flat(p.astype(dout.dtype)), flat(doi),
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum("BKQH,BKSH->BKQS", flat(doi), vj, preferred_element_type=jnp.float32)
      ds = p * (dp.reshape(p.shape) - delta_i[..., None])  # [B, K, G, blk, blk]
      dqi = dqi + jnp.einsum("BKQS,BKSH->BKQH", flat(ds.astype(k.dtype)), kj,
                             preferred_element_type=jnp.float32).reshape(dqi.shape)
      dk_j = jnp.einsum("BKQS,BKQH->BKSH", flat(ds.astype(q.dtype)), flat(qi),
                        preferred_element_type=jnp.float32)
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
          acc, _blocks(acc, 2, j, blk) + x, j * blk, axis=2)
      return dqi, add(dk, dk_j), add(dv, dv_j)

    dqi = jnp.zeros((b, kh, g, blk, h), jnp.float32)
    dqi, dk, dv = jax.lax.fori_loop(0, i + 1, key_block, (dqi, dk, dv))
    return jax.lax.dynamic_update_slice_in_dim(dq, dqi, i * blk, axis=3), dk, dv

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, t // blk, query_block, (zeros(q), zeros(k), zeros(v)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------------------------
# splash (Pallas, TPU)
# --------------------------------------------------------------------------------------------------


def _splash_local(q, k, v, segments, interpret: bool):
  """One device's share: q [b, N', T, H] (pre-scaled), k, v [b, K', T, H], segments [b, T]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  n, t = q.shape[1], q.shape[2]
  blk = min(512, t) if t % 512 == 0 else SPLASH_BLOCK
  sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                        block_kv_dq=blk)
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(n)])
  kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, sa.SegmentIds(q=s, kv=s)))(
      q, k, v, segments)


def _mesh_axes(mesh, logical: str, size: int):
  """The mesh axes a logical axis maps to under the current rules, dropped where they would not
  divide `size` evenly (as `sharding.logical_to_mesh` does for parameters)."""
  import flax.linen as nn
  spec = nn.logical_to_mesh_axes((logical,))
  axes = spec[0] if spec else None
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  kept, prod = [], 1
  for name in names:
    if name in mesh.shape and size % (prod * mesh.shape[name]) == 0:
      kept.append(name)
      prod *= mesh.shape[name]
  return tuple(kept) or None


def splash(q: Array, k: Array, v: Array, key_mask: Array, interpret: bool | None = None) -> Array:
  """Same contract as `attend`; see the module docstring. Interpret mode off TPU by default."""
  b, t, n, h = q.shape
  kh = k.shape[1]
  if interpret is None:
    interpret = _platform() != "tpu"
  tp = _round_up(t, SPLASH_BLOCK)  # padded slots join the padding segment; their rows are dropped
  q = _pad_len((q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).transpose(0, 2, 1, 3), 2, tp)
  k, v = _pad_len(k, 2, tp), _pad_len(v, 2, tp)
  segments = _pad_len(key_mask.astype(jnp.int32), 1, tp)
  fn = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    from jax.sharding import PartitionSpec as P
    batch = _mesh_axes(mesh, "activation_batch", b)
    heads = _mesh_axes(mesh, "activation_kv_heads", kh)  # kv heads, and their query heads with them
    heads_spec = P(batch, heads, None, None)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec,
                                                P(batch, None)), out_specs=heads_spec,
                       check_vma=False)
  out = fn(q, k, v, segments)  # [B, N, Tp, H]
  return out[:, :, :t].transpose(0, 2, 1, 3)


# --------------------------------------------------------------------------------------------------
# cuDNN (GPU)
# --------------------------------------------------------------------------------------------------


def cudnn(q: Array, k: Array, v: Array, key_mask: Array, implementation: str = "cudnn") -> Array:
  """Same contract as `attend` for rows whose real tokens are contiguous; see the module doc.
  `implementation="xla"` runs the same alignment through XLA's kernel (any platform; tests)."""
  b, t, n, h = q.shape
  lengths = jnp.sum(key_mask.astype(jnp.int32), axis=1)
  shift = jnp.argmax(key_mask, axis=1)  # leading padding of each row
  cols = (jnp.arange(t)[None, :] + shift[:, None]) % t  # [B, T]: left-aligned slot -> old slot
  roll = lambda x, c: jnp.take_along_axis(x, c[:, :, None, None], axis=1)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, T, K, H]
  out = jax.nn.dot_product_attention(
      roll(q, cols), roll(k, cols), roll(v, cols), scale=1.0 / math.sqrt(h), is_causal=True,
      query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
  # Rows past a sequence's length are padding: zeros, whatever the kernel left there, so that no
  # NaN reaches a later layer's values (0 * NaN is NaN even under a zero probability).
  out = jnp.where((jnp.arange(t)[None, :] < lengths[:, None])[:, :, None, None], out, 0)
  back = (jnp.arange(t)[None, :] - shift[:, None]) % t
  return roll(out, back)
