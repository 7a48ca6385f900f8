"""The continuous-batching engine against the static sampler: same tokens, lengths, finish reasons,
log-probs and entropies from the same rng, with fewer slots than rows (so slots are refilled)."""

import os
import textwrap

import jax
import numpy as np
import pytest

from explore_jax import rollout as rollout_lib
from explore_jax.models import qwen2
from explore_jax.rollout import engine as rollout_engine
from explore_jax.rollout import sampling
import fake_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared with the mesh subprocess below.
COMPARE = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from explore_jax import rollout as rollout_lib
    from explore_jax.rollout import sampling
    from explore_jax.models import qwen2

    def tiny():
      cfg = qwen2.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              rope_theta=1e4)
      # Scaled weights: peaked, varied continuations (at init scale they repeat one token).
      return cfg, jax.tree.map(lambda x: x * 3, qwen2.init_params(cfg, jax.random.key(0)))

    def prompts(b=6, p=6):
      rng = np.random.default_rng(0)
      tokens = rng.integers(3, 128, (b, p)).astype(np.int32)
      mask = (np.arange(p)[None] >= rng.integers(0, p, b)[:, None]).astype(np.int32)
      return tokens, mask

    def compare(cfg, params, ref, got, greedy):
      '''Share of identical rows; each differing row must first differ at a near-tie.'''
      ref_t, got_t = np.asarray(ref.tokens), np.asarray(got.tokens)
      same = np.all(ref_t == got_t, axis=1) & (np.asarray(ref.lengths) == np.asarray(got.lengths))
      same &= np.asarray(ref.finish_reason) == np.asarray(got.finish_reason)
      m = np.asarray(ref.mask).astype(bool)
      for row in np.nonzero(same)[0]:
        np.testing.assert_allclose(np.asarray(got.logprobs)[row], np.asarray(ref.logprobs)[row],
                                   atol=1e-4)
        np.testing.assert_allclose(np.asarray(got.entropy)[row], np.asarray(ref.entropy)[row],
                                   atol=1e-4)
      for row in np.nonzero(~same)[0]:
        t = int(np.nonzero(ref_t[row] != got_t[row])[0][0])
        full = np.concatenate([np.asarray(ref.prompt_tokens)[row], ref_t[row, :t]])[None]
        fmask = np.concatenate([np.asarray(ref.prompt_mask)[row], np.ones(t, np.int32)])[None]
        logp = np.asarray(jax.nn.log_softmax(qwen2.forward(params, full, cfg, fmask)[0, -1]))
        gap = abs(logp[ref_t[row, t]] - logp[got_t[row, t]])
        # Greedy: the two tokens were (nearly) tied; sampled: both were likely under the policy.
        assert gap < (1e-3 if greedy else 2.0), (row, t, gap)
      return float(same.mean())

    def spread_eos(cfg, params, tokens, mask, max_new_tokens):
      '''An EOS that the greedy continuations emit at different positions: rows of different
      lengths.'''
      free = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(0),
                                  max_new_tokens=max_new_tokens, temperature=0.0,
                                  eos_id=sampling.NO_EOS)
      return int(np.argmax(np.bincount(np.asarray(free.tokens)[:, 2:].ravel(), minlength=128)))

    def mesh_case():
      '''The 8-device cases: the model, 8 prompts, an EOS that ends rows at spread lengths, a
      (2, 2, 2) mesh (4 batch shards of 2 prompts, kv heads over 2), the params on it and the
      prompts' sharding.'''
      from jax.sharding import NamedSharding, PartitionSpec
      from explore_jax.tpu import sharding
      cfg, params = tiny()
      tokens, mask = prompts(8)
      eos = spread_eos(cfg, params, tokens, mask, 16)
      mesh = sharding.make_mesh((2, 2, 2))
      params_m = jax.device_put(params, sharding.logical_to_mesh(qwen2.logical_axes(cfg), params,
                                                                 mesh))
      batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
      return cfg, params, tokens, mask, eos, mesh, params_m, batch
""")

exec(COMPARE)


@pytest.fixture(scope="module")
def setup():
  cfg, params = tiny()
  tokens, mask = prompts()
  return cfg, params, tokens, mask, spread_eos(cfg, params, tokens, mask, 24)


@pytest.mark.parametrize("greedy", [True, False])
def test_continuous_equals_static(setup, greedy, monkeypatch):
  monkeypatch.setattr(rollout_engine, "RAGGED_COST", 0.0)  # every chunk reads ragged
  cfg, params, tokens, mask, eos = setup
  kw = dict(max_new_tokens=24, eos_id=eos, n=3, **({"temperature": 0.0} if greedy else
                                                    {"temperature": 1.0, "top_p": 0.9}))
  ref = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), **kw)
  # Blocks of 4 slots: rows of 7 to 30 filled slots read 2 to 8 blocks each.
  got, stats = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), engine="continuous",
                                    slots=4, chunk=4, kv_block=4, with_stats=True, **kw)
  lengths = np.asarray(ref.lengths)
  assert len(set(lengths.tolist())) >= 3 and (lengths < 24).any() and (lengths == 24).any()
  share = compare(cfg, params, ref, got, greedy)
  print(f"identical rows: {share:.0%}")
  assert share >= 0.95
  # 18 rows through 4 slots: refilled, and busy most of the time.
  assert stats["decode_steps"] < 24 * 18 / 4 + 24 and stats["slot_utilization"] > 0.6
  busy = int(np.sum(lengths)) - len(lengths)  # decode steps of live rows (first tokens: prefill)
  assert stats["busy_slot_steps"] == busy
  # The ragged decode reads whole blocks: at least each row's filled slots (decode step j of a
  # row attends its P prompt slots and j response slots) and at most every slot's blocks.
  p = tokens.shape[1]
  assert stats["ragged_chunks"] == stats["chunks"] < stats["decode_steps"]
  assert stats["kv_filled_positions"] <= stats["kv_read_positions"] <= (
      stats["decode_steps"] * 4 * -(-(p + 24) // 4) * 4)
  assert stats["kv_read_over_filled"] == stats["kv_read_positions"] / stats["kv_filled_positions"]
  assert stats["kv_read_over_filled"] < 1.6, stats
  if not greedy:
    # A row's draws follow its prompt's index, not its batch mates or place (same shapes: no
    # compile): the prompts reversed, with their indices, give the same rows reversed.
    back = rollout_lib.generate(cfg, params, tokens[::-1], mask[::-1], jax.random.key(1),
                                prompt_index=np.arange(6)[::-1], **kw)
    np.testing.assert_array_equal(np.asarray(back.tokens).reshape(6, 3, -1)[::-1],
                                  np.asarray(ref.tokens).reshape(6, 3, -1))
    other = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), sample_offset=3, **kw)
    assert np.mean(np.all(np.asarray(other.tokens) == np.asarray(ref.tokens), axis=1)) < 0.5


def test_continuous_fixed_lengths_and_bad_input(setup, monkeypatch):
  monkeypatch.setattr(rollout_engine, "RAGGED_COST", 0.0)
  cfg, params, tokens, mask, _ = setup
  # The shapes of the greedy test above (eos_id is traced): nothing compiles again.
  kw = dict(max_new_tokens=24, eos_id=sampling.NO_EOS, n=3, temperature=0.0)
  ref = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(2), **kw)
  reads = {}
  # Ragged in blocks of 5 (gathered by block index: 30 slots; the tests above slice blocks of 4
  # at slot offsets), and the segmented view (every slot up to the longest row).
  for kv_block in (5, 0):
    got, stats = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(2),
                                      engine="continuous", slots=4, chunk=4, kv_block=kv_block,
                                      with_stats=True, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(got.finish_reason), np.asarray(ref.finish_reason))
    reads[kv_block] = stats["kv_read_over_filled"]
  # Refilled slots restart while their neighbours are far in: the view reads their empty tail.
  assert reads[5] < reads[0], reads
  # Fixed lengths: the 4 slots run in lockstep through 5 waves (18 rows) of 23 decode steps. A
  # chunk's view is the first of the static sampler's segment ends (6, 12, 18, 24 new tokens)
  # that holds P + t + 3 slots (chunk = 4 steps ahead, at most P + 24), and the chunk runs on
  # while every row's next step fits it: a row of t tokens writes slot P + t - 1.
  p, t, read = tokens.shape[1], 1, 0
  while t < 24:
    end = next(e for e in (6, 12, 18, 24) if e >= min(t + 3, 24))
    steps = min(end + 1, 24) - t
    read, t = read + 4 * steps * (p + end), t + steps
  # 6, 6, 6 and 5 steps. (The static sampler's segments end a step before their view is full:
  # 5, 6, 6, 6 steps, 9,840 positions.)
  assert stats["chunks"] == 5 * 4 and stats["kv_read_positions"] == 5 * read == 9480
  with pytest.raises(ValueError, match="engine="):
    rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(2), engine="pages", **kw)


def test_a_slot_that_ends_with_a_chunk_reads_one_block(setup, monkeypatch):
  """A row that ends while its neighbour runs on, with no row left to take its slot: the ragged
  read must give the dead slot one block, as the host counts it (its stale index would count all
  its row's blocks: the chunk's read overflows, and the engine stops with an error)."""
  monkeypatch.setattr(rollout_engine, "RAGGED_COST", 0.0)
  cfg, params, tokens, mask, _ = setup
  free = np.asarray(rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(0),
                                         max_new_tokens=24, temperature=0.0,
                                         eos_id=sampling.NO_EOS).tokens)
  # Prompts (a, b) and an EOS that ends a's row at 9 tokens (8 decode steps: 2 chunks of 4) and
  # that b's row never emits: b runs on in slot 1 after slot 0 dies.
  a, b, eos = next((a, b, int(free[a, 8])) for a in range(6) for b in range(6)
                   if a != b and free[a, 8] not in free[a, :8] and free[a, 8] not in free[b])
  kw = dict(max_new_tokens=24, temperature=0.0, eos_id=eos)
  pair, pair_mask = tokens[[a, b]], mask[[a, b]]
  ref = rollout_lib.generate(cfg, params, pair, pair_mask, jax.random.key(0), **kw)
  assert np.asarray(ref.lengths).tolist() == [9, 24]
  # Blocks of one slot: the dead slot's stale index would be P + 9 entries against 1 counted.
  got = rollout_lib.generate(cfg, params, pair, pair_mask, jax.random.key(0), engine="continuous",
                             slots=2, chunk=4, kv_block=1, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))


_MESH = COMPARE + textwrap.dedent("""
    from explore_jax.rollout import engine as rollout_engine
    rollout_engine.RAGGED_COST = 0.0  # every chunk reads ragged, in a shard_map
    cfg, params, tokens, mask, eos, mesh, params_m, batch = mesh_case()
    for greedy in (True, False):
      kw = dict(max_new_tokens=16, eos_id=eos, n=2,
                **({"temperature": 0.0} if greedy else {"top_p": 0.9}))
      ref = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), **kw)
      got = rollout_lib.generate(cfg, params_m, jax.device_put(tokens, batch),
                                 jax.device_put(mask, batch), jax.random.key(1), mesh=mesh,
                                 engine="continuous", slots=8, chunk=4, kv_block=2, **kw)
      assert len(got.tokens.sharding.device_set) == 8, got.tokens.sharding
      assert len(set(np.asarray(ref.lengths).tolist())) >= 3
      share = compare(cfg, params, ref, got, greedy)
      assert share >= 0.95, share
      print("SHARE", greedy, share)
    print("MESH_OK")
""")


@pytest.mark.slow
def test_mesh_continuous_equals_single_device_static():
  print(fake_devices.run_script(_MESH, timeout=300, expect="MESH_OK"))
