"""The paged rollout engine against the static sampler (same tokens from the same rng, with rows
preempted and recomputed), its page attention against a dense read, its stats against their
definitions, and the same rollouts on a mesh of 8 fake devices and on 2 processes."""

import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explore_jax import rollout as rollout_lib
from explore_jax.models import attention, paged_attention
from explore_jax.rollout import paged, pages, sampling
import fake_devices
from test_rollout_engine import COMPARE, ROOT, setup  # noqa: F401
from test_train import REFERENCE, read_metrics, reference_run, run_train, train_env  # noqa: F401

exec(COMPARE)  # tiny, prompts, compare

PS = 4  # page size of the engine tests: prompts of 1 to 6 tokens share 0 or 1 full page


# --------------------------------------------------------------------------------------------------
# Page attention
# --------------------------------------------------------------------------------------------------


def _pool(rows=5, kv=2, groups=2, head=8, pages=32, page_size=4, width=6, seed=0):
  """A pool with rows at different lengths (0: idle) whose pages are scattered over it."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(rows, kv * groups, head)).astype(np.float32)
  kp = rng.normal(size=(kv, pages, page_size, head)).astype(np.float32)
  vp = rng.normal(size=(kv, pages, page_size, head)).astype(np.float32)
  table = rng.permutation(pages)[:rows * width].reshape(rows, width).astype(np.int32)
  reads = np.array([1, 4, 5, 0, 23][:rows], np.int32)  # positions attended; 0 = idle slot
  return q, kp, vp, table, reads


def _dense(q, kp, vp, table, reads):
  """The reference: each row's pages copied into a contiguous cache, read by attention.dense."""
  kv, _, ps, h = kp.shape
  k = kp[:, table].transpose(1, 0, 2, 3, 4).reshape(len(q), kv, -1, h)  # [S, K, W * PS, H]
  v = vp[:, table].transpose(1, 0, 2, 3, 4).reshape(len(q), kv, -1, h)
  mask = np.arange(k.shape[2])[None] < reads[:, None]
  return np.asarray(attention.dense(q[:, None], k, v, mask, (reads - 1)[:, None])[:, 0])


def test_gather_and_gpu_kernel_equal_a_dense_read():
  q, kp, vp, table, reads = _pool()
  ref = _dense(q, kp, vp, table, reads)
  live = reads > 0
  need = int(np.sum(-(-reads // 4)))  # 1 + 1 + 2 + 0 + 6 pages
  for entries in (need, need + 5, 64):  # exactly the rows' pages; padding; several levels
    got = paged_attention.attend(q, kp, vp, table, reads,
                                 paged_attention.PagedRead("gather", entries=entries))
    np.testing.assert_allclose(np.asarray(got)[live], ref[live], rtol=2e-5, atol=2e-6)
  # Too few entries drop the last row's last pages: then the output is wrong (the bound matters).
  short = paged_attention._gather(q, kp, vp, table, reads, need - 1)
  assert not np.allclose(np.asarray(short)[4], ref[4], atol=1e-3)
  # The Pallas GPU kernel (interpreted here); its table width must be a multiple of 8 blocks.
  read = paged_attention.PagedRead("pallas_gpu", block=1)
  wide = np.concatenate([table, np.zeros((len(q), 2), np.int32)], axis=1)  # 8 entries
  got = paged_attention.attend(q, kp, vp, wide, reads, read)
  np.testing.assert_allclose(np.asarray(got)[live], ref[live], rtol=2e-5, atol=2e-5)
  # The native CPU kernel (built here on first use) reads each row's pages in place.
  got = paged_attention.attend(q, kp, vp, table, reads, paged_attention.PagedRead("native_cpu"))
  np.testing.assert_allclose(np.asarray(got)[live], ref[live], rtol=2e-5, atol=2e-6)
  assert not np.asarray(got)[~live].any()  # an idle row reads nothing: 0
  # Loading it left the process's floats alone: subnormals still exist (a library linked with
  # fast math would have set flush-to-zero for every thread that loads it).
  assert np.float32(np.finfo(np.float32).tiny) / np.float32(2) > 0
  # The kernels' read: each live row's pages in whole blocks of 2 pages of 4 positions.
  counted = paged_attention.kernel_reads(jnp.asarray(reads), jnp.asarray(live), 4, 2)
  assert np.asarray(counted).tolist() == [8, 8, 8, 0, 24]
  assert int(paged_attention.gather_read(jnp.asarray(reads), 4, 64)) == 16 * 4  # level 16


def test_decode_layer_writes_the_step_before_reading_it():
  q, kp, vp, table, reads = _pool()
  rng = np.random.default_rng(1)
  key, val = (rng.normal(size=(5, 2, 1, 8)).astype(np.float32) for _ in range(2))
  lengths, live = jnp.asarray(np.maximum(reads - 1, 0)), jnp.asarray(reads > 0)
  cache = paged_attention.PagedCache(k=(jnp.asarray(kp),), v=(jnp.asarray(vp),),
                                     table=jnp.asarray(table), lengths=lengths, live=live,
                                     read=paged_attention.PagedRead("gather", entries=32))
  out, cache = paged_attention.decode_layer(cache, 0, q[:, None], key, val)
  kp2, vp2 = np.array(kp), np.array(vp)
  for s in np.nonzero(reads > 0)[0]:  # each live row's key and value land at its position
    page, offset = table[s, lengths[s] // 4], lengths[s] % 4
    kp2[:, page, offset], vp2[:, page, offset] = key[s, :, 0], val[s, :, 0]
  np.testing.assert_array_equal(np.asarray(cache.k[0]), kp2)  # idle slot 3 wrote nothing
  np.testing.assert_array_equal(np.asarray(cache.v[0]), vp2)
  ref = _dense(q, kp2, vp2, table, reads)
  np.testing.assert_allclose(np.asarray(out)[reads > 0, 0], ref[reads > 0], rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_tpu_kernel_interpreted_equals_the_gather():
  """The Pallas TPU kernel under the TPU interpreter (slow: one tiny case). It reads K/V as
  bfloat16, so it matches the gather over bf16-rounded K/V, not the float32 one."""
  from jax.experimental.pallas import tpu as pltpu
  q, kp, vp, table, reads = _pool(rows=3, pages=12, width=4)
  reads = np.array([5, 0, 16], np.int32)
  bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  ref = np.asarray(paged_attention._gather(q, bf(kp), bf(vp), table, reads, 16))
  with pltpu.force_tpu_interpret_mode():
    got = np.asarray(paged_attention.attend(q, kp, vp, table, reads,
                                            paged_attention.PagedRead("pallas_tpu", block=2)))
  np.testing.assert_allclose(got[[0, 2]], ref[[0, 2]], atol=2e-5)
  assert not np.allclose(got[[0, 2]], np.asarray(paged_attention._gather(
      q, kp, vp, table, reads, 16))[[0, 2]], atol=1e-4)  # bf16 matters at this scale


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


def _filled(lengths, prompt_len):
  """KV positions the rows attend: decode step j (1 .. l - 1) of a row reads its prompt and j."""
  total = 0
  for length, p in zip(lengths, prompt_len):
    total += sum(p + j for j in range(1, length))
  return total


@pytest.mark.slow
@pytest.mark.parametrize("greedy", [True, False])
def test_paged_equals_static_through_preemption(setup, greedy, monkeypatch):
  """A pool too small for the rows' lengths (rows are preempted and recomputed) and one with room
  for every slot's full row give the static sampler's rollout. Prompts of 1 to 6 tokens in pages
  of 4: some share a full prompt page among their 3 samples, each copies a partial one. Greedy
  reads with the native CPU kernel (`auto` on CPU), sampled with the pure-JAX gather."""
  if greedy:
    monkeypatch.setattr(pages, "MIN_SLOTS", 2)  # the drain runs in 4 and then 2 slots
  cfg, params, tokens, mask, eos = setup
  kw = dict(max_new_tokens=24, eos_id=eos, n=3, **({"temperature": 0.0} if greedy else
                                                    {"temperature": 1.0, "top_p": 0.9}))
  ref = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), **kw)
  lengths = np.asarray(ref.lengths)
  assert len(set(lengths.tolist())) >= 3 and (lengths < 24).any() and (lengths == 24).any()
  runs = {}
  for kv_pages in (0, 20):  # 20: a full row (8 pages) beside 6 prompts' 2 pages each, no more
    got, stats = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1),
                                      engine="paged", slots=8, kv_pages=kv_pages, page_size=PS,
                                      page_attention="auto" if greedy else "gather",
                                      with_stats=True, **kw)
    assert stats["page_attention"] == ("native_cpu" if greedy else "gather")
    assert compare(cfg, params, ref, got, greedy) >= 0.95
    runs[kv_pages] = stats
  roomy, tight = runs[0], runs[20]
  assert roomy["preemptions"] == 0 and tight["preemptions"] > 0, (roomy, tight)
  assert tight["peak_pages"] <= 20 and roomy["peak_pages"] <= roomy["kv_pages"]
  # Every decode step of every row, once (its first token came with its prefill); a preempted
  # row's steps run again.
  busy = int(np.sum(lengths)) - len(lengths)
  assert roomy["busy_slot_steps"] == busy < tight["busy_slot_steps"]
  # 8 slots for 18 rows: slots were refilled on the device, the host called in few times (a
  # prefill of ceil(8 / 3) prompts, the drain's smaller calls).
  assert roomy["host_round_trips"] <= 6 and roomy["decode_steps"] < 24 * 18 / 8 + 24
  assert 0.6 < roomy["slot_utilization"] <= 1
  # KV read: every row's filled positions, in whole blocks of 2 pages (at most 8 more a row-step).
  filled = _filled(lengths, np.asarray(mask).sum(1).repeat(3))
  assert roomy["kv_filled_positions"] == filled
  assert filled < roomy["kv_read_positions"] <= filled + 7 * busy
  assert roomy["kv_read_over_filled"] == roomy["kv_read_positions"] / filled
  if greedy:  # the native kernel reads exactly the positions
    assert roomy["kv_own_read_positions"] == filled
  else:  # the gather's flat list: at least the rows' pages
    assert roomy["kv_own_read_positions"] >= roomy["kv_read_positions"] - 4 * busy


def test_fixed_lengths_read_exactly_and_bad_input(setup, monkeypatch):
  cfg, params, tokens, mask, _ = setup
  kw = dict(max_new_tokens=24, eos_id=sampling.NO_EOS, n=3, temperature=0.0)
  ref = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(2), **kw)
  # On CPU the gather's engine decodes with the program compiled for it (YNNPACK for its dots
  # only).
  cpu_calls = []
  monkeypatch.setattr(paged, "_decode_cpu", lambda *a, _f=paged._decode_cpu, **k: (
      cpu_calls.append(1), _f(*a, **k))[1])
  monkeypatch.setattr(paged, "_decode", None)
  got, stats = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(2), engine="paged",
                                    slots=8, page_size=PS, page_attention="gather",
                                    with_stats=True, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(got.finish_reason), np.asarray(ref.finish_reason))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-4)
  # The kernels read each row's pages in blocks of 8 positions: decode step j of a row with a
  # prompt of p tokens reads ceil((p + j) / 8) blocks.
  plen = np.asarray(mask).sum(1).repeat(3)
  blocks = sum(-(-(p + j) // 8) * 8 for p in plen for j in range(1, 24))
  assert stats["kv_read_positions"] == blocks and stats["preemptions"] == 0
  assert stats["kv_filled_positions"] == _filled([24] * 18, plen)
  assert len(cpu_calls) == stats["host_round_trips"] > 0
  with pytest.raises(ValueError, match="kv_pages=12 .* at least 20"):
    rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(2), engine="paged", slots=8,
                         kv_pages=12, page_size=PS, **kw)
  with pytest.raises(ValueError, match="page_size=0"):
    rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(2), engine="paged", slots=8,
                         page_size=0, **kw)
  with pytest.raises(ValueError, match="page_attention='flash'"):
    rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(2), engine="paged", slots=8,
                         page_attention="flash", **kw)


_MESH = COMPARE + textwrap.dedent("""
    cfg, params, tokens, mask, eos, mesh, params_m, batch = mesh_case()
    for greedy in (True, False):
      kw = dict(max_new_tokens=16, eos_id=eos, n=2,
                **({"temperature": 0.0} if greedy else {"top_p": 0.9}))
      ref = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), **kw)
      # 2 slots and 10 pages of 4 per shard: a full row (6 pages) and 2 prompts' pages.
      got, stats = rollout_lib.generate(
          cfg, params_m, jax.device_put(tokens, batch), jax.device_put(mask, batch),
          jax.random.key(1), mesh=mesh, engine="paged", slots=8, kv_pages=40, page_size=4,
          with_stats=True, **kw)
      assert len(got.tokens.sharding.device_set) == 8, got.tokens.sharding
      assert len(set(np.asarray(ref.lengths).tolist())) >= 3
      share = compare(cfg, params, ref, got, greedy)
      assert share >= 0.95, share
      assert stats["peak_pages"] <= 40
      print("SHARE", greedy, share, "PREEMPTED", stats["preemptions"])
    print("MESH_OK")
""")


@pytest.mark.slow
def test_mesh_paged_equals_single_device_static():
  print(fake_devices.run_script(_MESH, timeout=600, expect="MESH_OK"))


@pytest.mark.slow
def test_two_processes_paged_equals_static():
  """2 processes x 2 fake devices: each decides the same schedule from replicated state (a
  process that decided otherwise would hang the other in a collective, or write other rows)."""
  from test_multihost import launch_two
  cmd = [sys.executable, os.path.join(ROOT, "tests", "two_process_paged.py")]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  outs = [out for out, _ in launch_two([cmd, cmd], env, ROOT, timeout=600)]
  lines = [next(line for line in out.splitlines() if line.startswith("SHARE")) for out in outs]
  assert lines[0] == lines[1], lines  # the same rollout and stats on both
  share, preempted = float(lines[0].split()[1]), int(lines[0].split()[3])
  assert share >= 0.95 and preempted > 0, lines


@pytest.mark.slow
def test_trainer_with_the_paged_engine_logs_the_reference_run(
    train_env, reference_run, tmp_path):  # noqa: F811
  """`rollout.engine=paged` in the trainer, its pool too small for the 8 slots' full rows (16
  pages of 8 positions against 8 x 5): the losses of the continuous engine's run."""
  run_train(train_env, tmp_path / "paged", variant="entropy_reg", overrides=REFERENCE + [
      "--config.export_hf=False", "--config.rollout.engine=paged", "--config.rollout.kv_pages=16",
      "--config.rollout.page_size=8"])
  one, paged_run = read_metrics(reference_run), read_metrics(tmp_path / "paged")
  assert len(one) == len(paged_run) == 4
  for a, b in zip(one, paged_run):
    for key in ("actor/loss", "actor/entropy", "actor/grad_norm", "reward/mean",
                "rollout/response_length_mean"):
      np.testing.assert_allclose(b[key], a[key], rtol=2e-4, atol=2e-5, err_msg=key)
    assert 0 < b["rollout/slot_utilization"] <= 1


def test_native_cpu_kernel_bf16_bad_input_and_fallback(monkeypatch, tmp_path):
  from explore_jax.models import cpu_paged_attention
  q, kp, vp, table, reads = _pool()
  live = reads > 0
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  # bfloat16 pages: computed in float32 from the bf16 values, the output rounded to bf16.
  got = cpu_paged_attention.attend(bf(q), bf(kp), bf(vp), table, reads)
  assert got.dtype == jnp.bfloat16
  f32 = lambda x: np.asarray(bf(x).astype(jnp.float32))
  ref = _dense(f32(q), f32(kp), f32(vp), table, reads)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32))[live], ref[live], rtol=1e-2,
                             atol=1e-2)
  # A row that claims more positions than its table holds reads its table's pages only, and a
  # page id outside the pool is clamped into it: a wrong page, never memory outside the pool.
  long_reads = reads.copy()
  long_reads[4] = 10 * 6 * 4
  bad = table.copy()
  bad[0, 0] = 10 ** 6
  out = cpu_paged_attention.attend(q, kp, vp, bad, long_reads)
  full = _dense(q, kp, vp, table, np.where(np.arange(5) == 4, 24, reads))
  np.testing.assert_allclose(np.asarray(out)[4], full[4], rtol=2e-5, atol=2e-6)
  clamped = table.copy()
  clamped[0, 0] = kp.shape[1] - 1
  np.testing.assert_allclose(np.asarray(out)[0], _dense(q, kp, vp, clamped, reads)[0],
                             rtol=2e-5, atol=2e-6)
  with pytest.raises(ValueError, match="float16"):
    cpu_paged_attention.attend(q.astype(np.float16), kp.astype(np.float16),
                               vp.astype(np.float16), table, reads)
  with pytest.raises(ValueError, match="native_cpu.*float16"):
    pages.kernel_for("cpu", "native_cpu", jnp.float16)
  with pytest.raises(ValueError, match="native_cpu.*CPU only, not on tpu"):
    pages.kernel_for("tpu", "native_cpu")
  # Where no compiler builds it, `auto` falls back to the gather and naming it says why.
  monkeypatch.setenv("EXPLORE_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(cpu_paged_attention, "_compiler", lambda: None)
  monkeypatch.setattr(cpu_paged_attention, "available", lambda: False)
  assert pages.kernel_for("cpu", "auto") == "gather"
  assert pages.kernel_for("tpu", "auto") == "pallas_tpu"
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
    pages.kernel_for("cpu", "native_cpu")
