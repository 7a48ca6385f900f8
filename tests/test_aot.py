"""`python -m explore_jax.aot` compiles the trainer's programs for a TPU topology on this CPU machine
(libtpu from `make tpu-compiler`, beside the venv), and its figures are the ones a correct count
gives: the train state's bytes from the parameter count, FLOPs per call from the closed-form
transformer count (a missed trip count or layer factor is off by 2x to 8x)."""

import json
import os
import subprocess
import sys

import pytest

from explore_jax.models import qwen2
from explore_jax.tpu import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILER = os.environ.get("EXPLORE_JAX_TPU_COMPILER",
                          os.path.join(REPO, ".venv", "tpu-compiler"))
# Head dim 128 (splash attention's lane width, which `auto` picks on TPU); 2 layers; heads that
# split evenly over tensor = 2 (a replicated computation is every device's work, and counted so).
MODEL = qwen2.Qwen2Config(vocab_size=512, hidden_size=512, intermediate_size=1024,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          rope_theta=1e4, tie_word_embeddings=False, max_position_embeddings=4096)
P, N, PROMPTS, SAMPLES, SLOTS, CHUNK = 128, 128, 8, 4, 16, 8
SMALL = [f"--config.data.prompts_per_step={PROMPTS}", f"--config.rollout.n={SAMPLES}",
         "--config.rl.mini_batch_size=16", f"--config.data.max_prompt_len={P}",
         f"--config.rollout.chunk={CHUNK}", "--config.mesh.shape=(1,2,2)"]
CONTINUOUS = ["--config.rollout.engine=continuous"]  # the 7B configs' engine is the paged one


def _aot(model_dir, topology, extra):
  if not os.path.isdir(os.path.join(COMPILER, "libtpu")):
    if os.environ.get("CI"):
      pytest.fail(f"{COMPILER}: no libtpu; `make tpu-compiler` installs it (make test does)")
    pytest.skip(f"{COMPILER}: no libtpu (make tpu-compiler)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([COMPILER, REPO]))
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "explore_jax.aot", "--config", "configs/grpo_qwen25_7b.py",
         "--topology", topology, f"--config.model.path={model_dir}", *SMALL, *extra]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  lines = proc.stdout.strip().splitlines()
  assert lines, proc.stderr[-3000:]
  return proc.returncode, json.loads(lines[-1]), proc.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("aot_model")
  (path / "config.json").write_text(json.dumps(MODEL.to_hf_dict()))
  return str(path)


def _token_flops(cfg, keys: int) -> float:
  """Forward FLOPs of one token: every matmul (2 x its weights) and attention over `keys`."""
  d, h = cfg.hidden_size, cfg.head_dim
  layer = (d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * h
           + cfg.num_attention_heads * h * d + 3 * d * cfg.intermediate_size)
  attention = 4 * cfg.num_attention_heads * h * keys
  return cfg.num_hidden_layers * (2 * layer + attention)


@pytest.mark.slow
def test_programs_for_a_v5p_slice_fit_and_count_what_they_compute(model_dir):
  rc, report, out = _aot(model_dir, "v5p-8", CONTINUOUS + [f"--config.rollout.max_new_tokens={N}",
                                                          f"--config.rollout.slots={SLOTS}"])
  assert rc == 0, out
  assert (report["topology"], report["devices"], report["chip"]) == ("v5p-8", 4, "v5p")
  assert report["hbm_bytes_per_device"] == memory.HBM_BYTES["v5p"]
  progs = report["programs"]
  assert sorted(progs) == ["rollout/decode", "rollout/insert", "rollout/prefill", "score",
                           "update"]
  assert all(p["fits"] for p in progs.values())
  # Beside the insert stays the whole train state: f32 params, AdamW's f32 mu and nu.
  state = 12 * memory.sharded_param_count(MODEL, (1, 2, 2))
  assert state <= progs["rollout/insert"]["resident_bytes"] < 1.01 * state
  # The decode is counted at its largest read: here the view of P + 3N/4 slots (the segment end
  # below the last), whose copy in the chunk needs more than the ragged read of every block.
  assert progs["rollout/decode"]["read"] == f"view of {P + 3 * N // 4} slots"
  # The update donates the state: its outputs alias its arguments.
  assert progs["update"]["alias_bytes"] >= 0.99 * state
  vocab = 2 * MODEL.hidden_size * MODEL.vocab_size  # the output projection of one token
  # Decode: CHUNK steps of every slot over the whole cache (P + N keys); 4 devices share them.
  decode = CHUNK * SLOTS * (_token_flops(MODEL, P + N) + vocab) / 4
  assert progs["rollout/decode"]["flops"] == pytest.approx(decode, rel=0.1)
  # Update: every row's P + N tokens through remat'd layers (forward, its recomputation and the
  # backward pass: 4 forwards, dense attention over all T keys) and the N response tokens
  # through the output projection (3 forwards), once per epoch.
  rows, t = PROMPTS * SAMPLES, P + N
  update = (rows * t * 4 * _token_flops(MODEL, t) + rows * N * 3 * vocab) / 4
  assert progs["update"]["flops"] == pytest.approx(update, rel=0.15)
  # Score: one forward of the same rows.
  score = (rows * t * _token_flops(MODEL, t) + rows * N * vocab) / 4
  assert progs["score"]["flops"] == pytest.approx(score, rel=0.15)
  assert "rollout/decode" in out and "fits" in out


@pytest.mark.slow
def test_a_rollout_too_large_for_the_chip_exits_1(model_dir):
  # 16384 slots x 2048 positions x 2 layers x 2 kv heads: 16 GiB of cache per device of a v5e
  # (16 GiB HBM), slots over 2 batch shards and kv heads over 2.
  rc, report, out = _aot(model_dir, "v5e:2x2", CONTINUOUS + [
      "--noflops", "--programs=rollout/decode,score", "--config.rollout.max_new_tokens=1920",
      "--config.rollout.slots=16384"])
  assert rc == 1
  progs = report["programs"]
  assert report["chip"] == "v5e" and report["hbm_bytes_per_device"] == memory.HBM_BYTES["v5e"]
  assert sorted(progs) == ["rollout/decode", "score"]
  assert not progs["rollout/decode"]["fits"] and progs["score"]["fits"]
  decode = progs["rollout/decode"]
  if decode["bytes_per_device"] is None:  # the compiler itself refused it
    assert "HBM" in decode["error"], decode
  else:  # k and v of 2 layers, bf16, slots over 2 batch shards, kv heads over 2
    assert decode["argument_bytes"] >= 16384 * 2048 * 2 * 2 * MODEL.head_dim * 2 // 2
  assert "DOES NOT FIT" in out


@pytest.mark.slow
def test_paged_decode_compiles_with_the_pallas_kernel_and_reports_its_pool(model_dir):
  # 16 slots on 2 batch shards over 128 pages of 16 positions: the bytes of 8 full rows of
  # P + N = 256 positions; each shard holds at least a full row (16 pages) and 4 prompts' pages.
  rc, report, out = _aot(model_dir, "v5p-8", [
      "--noflops", "--programs=rollout/prefill,rollout/decode", "--config.rollout.engine=paged",
      f"--config.rollout.max_new_tokens={N}", f"--config.rollout.slots={SLOTS}",
      "--config.rollout.kv_pages=128", "--config.rollout.page_size=16",
      "--config.rollout.page_block=2"])
  assert rc == 0, out
  progs, pool = report["programs"], report["page_pool"]
  assert sorted(progs) == ["rollout/decode", "rollout/prefill"]  # no insert: refill is on device
  decode = progs["rollout/decode"]
  assert decode["read"] == "paged (pallas_tpu)" and decode["pallas_kernel"] and decode["fits"]
  # Keys and values of 2 layers, 1 of the 2 kv heads per device (tensor 2), head dim 128, bf16.
  position = 2 * 2 * 1 * MODEL.head_dim * 2
  assert pool["pages_per_device"] == 64 and pool["slots"] == SLOTS
  assert pool["pool_bytes_per_device"] == 64 * 16 * position
  assert pool["contiguous_rows_same_bytes"] == 8
  assert decode["argument_bytes"] >= pool["pool_bytes_per_device"]
  assert 0 < pool["peak_pool_share"] <= 1 and 0 < pool["rows_in_flight"] <= SLOTS
  assert pool["kv_read_bytes_per_step"] == pytest.approx(pool["kv_read_positions_per_step"]
                                                         * position)
  # Blocks of 32 positions over rows of 128 prompt tokens and geometric responses: little waste.
  assert 1.0 < pool["kv_read_over_filled"] < 1.25
  assert "page pool: 128 pages of 16 positions" in out
