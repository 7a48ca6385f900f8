"""Ragged decode attention against the dense decode: same output from the filled blocks only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explore_jax.models import attention, decode_attention


def _case(rows=7, kv=2, groups=3, slots=40, head=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(rows, 1, kv * groups, head)).astype(np.float32)
  k = rng.normal(size=(rows, kv, slots, head)).astype(np.float32)
  v = rng.normal(size=(rows, kv, slots, head)).astype(np.float32)
  # Rows at very different positions (0 = a refilled row's first step, slots - 1 = the last
  # slot), each with its own left padding; slots past a row's query are garbage from an earlier
  # row that a dense read masks out.
  query = np.array([0, 5, 16, 17, 39, 31, 8][:rows], np.int32)
  pad = np.array([0, 2, 3, 0, 10, 17, 1][:rows])
  mask = np.arange(slots)[None] >= pad[:, None]
  return q, k, v, mask, query


@pytest.mark.parametrize("block", [1, 4, 16, 40, 64])
def test_ragged_equals_dense(block):
  q, k, v, mask, query = _case()
  ref = attention.dense(q, k, v, mask, query[:, None])
  need = decode_attention.blocks_needed(query + 1, block)
  for blocks in (need, need + 5):  # the exact bound, and one with padding entries
    got = decode_attention.attend(q, k, v, mask, query[:, None],
                                  decode_attention.Ragged(blocks, block))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-6)
  # Garbage beyond each row's query slot, or in its padding, changes nothing.
  k2 = k.copy()
  for r, i in enumerate(query):
    k2[r, :, i + 1:] = 1e4
  k2[~mask[:, None, :].repeat(k.shape[1], 1)] = -1e4
  got = decode_attention.attend(q, k2, v, mask, query[:, None],
                                decode_attention.Ragged(need, block))
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-6)


def test_blocks_needed_and_read():
  # Rows of 1, 4, 5 and 9 filled slots in blocks of 4: 1 + 1 + 2 + 3 entries.
  assert decode_attention.blocks_needed([1, 4, 5, 9], 4) == 7
  # On two devices holding rows (1, 4) and (5, 9): the fuller one needs 5.
  assert decode_attention.blocks_needed([1, 4, 5, 9], 4, shards=2) == 5
  # The device-side check a decode chunk runs on: query slot q has q + 1 filled slots.
  query_slots = jnp.asarray([0, 3, 4, 8])
  assert bool(decode_attention.fits(query_slots, decode_attention.Ragged(7, 4)))
  assert not bool(decode_attention.fits(query_slots, decode_attention.Ragged(6, 4)))
  # Rows split over 2 batch shards (the count only reads the mesh's axis sizes): 5 on the fuller.
  mesh = jax.sharding.AbstractMesh((2, 1), ("data", "tensor"))
  halves = lambda blocks: decode_attention.Ragged(blocks, 4, mesh, jax.sharding.PartitionSpec(
      ("data", "tensor"), None, None, None))
  assert bool(decode_attention.fits(query_slots, halves(5)))
  assert not bool(decode_attention.fits(query_slots, halves(4)))
  # Too few entries drop the last blocks: the output is then wrong (the bound matters).
  q, k, v, mask, query = _case()
  ref = attention.dense(q, k, v, mask, query[:, None])
  short = decode_attention.attend(q, k, v, mask, query[:, None], decode_attention.Ragged(
      decode_attention.blocks_needed(query + 1, 4) - 1, 4))
  assert not np.allclose(np.asarray(short)[-1], np.asarray(ref)[-1], atol=1e-3)
  with pytest.raises(ValueError, match="one query per row"):
    decode_attention.attend(jnp.zeros((1, 2, 6, 8)), k[:1], v[:1], mask[:1],
                            jnp.zeros((1, 2), jnp.int32), decode_attention.Ragged(4, 4))
