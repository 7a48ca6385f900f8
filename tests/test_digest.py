"""The checkpoint digest (explore_jax/train/digest.py): equal to a NumPy reference written from
its definition, changed by any flipped byte or moved element, and the same on any mesh and
sharding (8 fake devices, in a subprocess)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from explore_jax.train import digest
import fake_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fmix32(h):
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def reference(x: np.ndarray) -> str:
  """h_i = fmix32(bits_i + i * 0x9E3779B9), i the row-major index; sum_i h_i and
  sum_i h_i * (2i + 1), modulo 2^32."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    bits = x.astype(np.uint32)
  else:
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint32)
  index = np.arange(bits.size, dtype=np.uint32).reshape(bits.shape)
  with np.errstate(over="ignore"):
    h = _fmix32(bits + index * np.uint32(0x9E3779B9))
    lanes = [int(np.sum(h, dtype=np.uint32)),
             int(np.sum(h * (index * np.uint32(2) + np.uint32(1)), dtype=np.uint32))]
  return f"{lanes[0]:08x}{lanes[1]:08x}"


def _one(x) -> str:
  return digest.compute({"x": x})[0]["x"]


def test_equals_the_numpy_reference():
  rng = np.random.RandomState(0)
  arrays = [rng.randn(5, 7, 3).astype(np.float32),
            rng.randn(4, 9).astype(ml_dtypes.bfloat16),
            rng.randn(33).astype(np.float16),
            rng.randint(-2**31, 2**31 - 1, (6, 5)).astype(np.int32),
            rng.randint(0, 2**32 - 1, (2,), dtype=np.uint64).astype(np.uint32),
            rng.rand(3, 4) > 0.5,
            np.float32(3.5)]
  for x in arrays:
    assert _one(jnp.asarray(x)) == reference(np.asarray(x)), x.dtype


def test_any_flipped_byte_or_moved_element_changes_it():
  x = np.random.RandomState(1).randn(8, 6).astype(np.float32)
  base = _one(jnp.asarray(x))
  raw = bytearray(x.tobytes())
  seen = set()
  for i in range(len(raw)):
    for mask in (0x01, 0x80):
      flipped = bytearray(raw)
      flipped[i] ^= mask
      d = _one(jnp.asarray(np.frombuffer(bytes(flipped), np.float32).reshape(x.shape)))
      assert d != base, (i, mask)
      seen.add(d)
  assert len(seen) == 2 * len(raw)  # and no two corruptions collide either
  swapped = x.copy()
  swapped[[0, 3]] = swapped[[3, 0]]
  assert _one(jnp.asarray(swapped)) != base
  assert _one(jnp.asarray(x.reshape(6, 8))) == base  # the row-major order is what counts


def test_reports_non_finite_arrays():
  tree = {"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan]), "c": jnp.arange(3)}
  digests, nonfinite = digest.compute(tree)
  assert sorted(digests) == ["a", "b", "c"] and nonfinite == ["b"]
  assert digest.differences({"a": digests["a"]}, digests) == ["b", "c"]


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from explore_jax.train import digest
x = np.random.RandomState(2).randn(16, 24).astype(np.float32)
b = x.astype(jnp.bfloat16)
out = []
for shape, spec in (((8,), P()), ((8,), P("a")), ((4, 2), P("a", "b")), ((2, 4), P("b", "a")),
                    ((8,), P(None, "a"))):
  mesh = jax.make_mesh(shape, ("a", "b")[:len(shape)])
  put = lambda v: jax.device_put(v, NamedSharding(mesh, spec))
  d, _ = digest.compute({"x": put(x), "b": put(b)})
  out.append(d["x"] + d["b"])
print("DIGESTS", *out)
"""


def test_the_same_on_every_mesh_and_sharding():
  out = fake_devices.run_script(SHARDED, timeout=300).split("DIGESTS")[1].split()
  assert len(out) == 5 and len(set(out)) == 1, out
  x = np.random.RandomState(2).randn(16, 24).astype(np.float32)
  assert out[0] == reference(x) + reference(x.astype(ml_dtypes.bfloat16))
