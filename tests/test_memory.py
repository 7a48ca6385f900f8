"""The analytic memory plan against the real arrays: parameter counts from eval_shape, per-device
shard sizes from `sharding.logical_to_mesh` on 8 fake devices, saved activations from JAX's own
list of residuals, and the KV cache from `qwen2.init_cache`."""

import contextlib
import io
import json
import math
import os
import re
import textwrap

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import pytest

from explore_jax.models import qwen2
from explore_jax.tpu import memory
import fake_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
  base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  base.update(kw)
  return qwen2.Qwen2Config(**base)


CONFIGS = {
    "untied": tiny(),
    "tied": tiny(tie_word_embeddings=True),
    # Dimensions that 2/4/8-way splits do not all divide: exercises the replication fallback.
    "odd": tiny(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=3),
    "mha": tiny(num_attention_heads=8, num_key_value_heads=8),
}


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(CONFIGS) + ["qwen2.5-7b"])
def test_param_count_matches_eval_shape(name):
  # The 7B widths and vocabulary with 2 of its 28 layers (identical layers; tracing 28 is slow).
  cfg = CONFIGS[name] if name in CONFIGS else qwen2.preset(name, num_hidden_layers=2)
  actor = jax.eval_shape(lambda r: qwen2.init_params(cfg, r), jax.random.key(0))
  critic = jax.eval_shape(lambda r: qwen2.init_critic_params(cfg, r), jax.random.key(0))
  assert memory.param_count(cfg) == _count(actor)
  assert memory.param_count(cfg, critic=True) == _count(critic)


def test_qwen25_7b_matches_the_model_card():
  # The Qwen2.5-7B model card: 7.61B parameters, 6.53B of them outside the two embeddings.
  cfg = qwen2.preset("qwen2.5-7b")
  n = memory.param_count(cfg)
  assert n == 7_615_616_512
  assert round((n - 2 * cfg.vocab_size * cfg.hidden_size) / 1e9, 2) == 6.53


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, optax
    from explore_jax.tpu import memory, sharding
    from explore_jax.models import qwen2
    sys.path.insert(0, "tests")
    from test_memory import CONFIGS
    out = []
    for name, cfg in CONFIGS.items():
      abstract = {}  # traced once per model, sharded on every mesh
      for critic in (False, True):
        logical = qwen2.logical_axes(cfg, critic)
        for dtype in ("float32", "bfloat16"):
          c = cfg.replace(param_dtype=dtype)
          init = qwen2.init_critic_params if critic else qwen2.init_params
          shapes = jax.eval_shape(lambda r: init(c, r), jax.random.key(0))
          opt = jax.eval_shape(optax.adamw(1e-3, mu_dtype=jnp.float32).init, shapes)
          abstract[critic, dtype] = shapes, opt, logical
      for mesh_shape in [(1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8), (8, 1, 1), (2, 4, 1)]:
        mesh = sharding.make_mesh(mesh_shape)
        for critic in (False, True):
          for dtype in ("float32", "bfloat16"):
            shapes, opt, logical = abstract[critic, dtype]
            shards = sharding.logical_to_mesh(logical, shapes, mesh)
            mu_nu = (memory.measured_bytes(opt[0].mu, shards)
                     + memory.measured_bytes(opt[0].nu, shards))
            out.append(dict(name=name, mesh=mesh_shape, critic=critic, dtype=dtype,
                            params=memory.measured_bytes(shapes, shards), mu_nu=mu_nu))
        for batch in (8, 6, 3):
          cache = jax.eval_shape(lambda: qwen2.init_cache(cfg, batch, 16, "bfloat16"))
          s = sharding.logical_sharding(qwen2.CACHE_AXES, cache.k[0].shape, mesh)
          layers = [*cache.k, *cache.v]
          out.append(dict(name=name, mesh=mesh_shape, batch=batch,
                          kv=memory.measured_bytes(layers, [s] * len(layers))))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_measurements():
  stdout = fake_devices.run_script(_SHARDED_SCRIPT, timeout=300)
  return json.loads(stdout.strip().splitlines()[-1])


def test_per_device_param_and_adamw_bytes_equal_real_shards(sharded_measurements):
  rows = [r for r in sharded_measurements if "params" in r]
  assert len(rows) == len(CONFIGS) * 6 * 2 * 2
  for r in rows:
    cfg = CONFIGS[r["name"]]
    p = memory.plan(cfg, mesh_shape=r["mesh"], algorithm="ppo" if r["critic"] else "grpo",
                    param_dtype=r["dtype"], opt_dtype="float32", nu_dtype=r["dtype"],
                    micro_batch=8, seq_len=16)
    who = "critic" if r["critic"] else "actor"
    assert p["components"][f"{who}_params"]["bytes"] == r["params"], r
    assert p["components"][f"{who}_adamw_mu_nu"]["bytes"] == r["mu_nu"], r
  # The meshes really split: 8-way fsdp divides all but the norms and the biases (no embed axis).
  cfg = CONFIGS["untied"]
  full = memory.param_count(cfg)
  rep = ((2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
         + cfg.num_hidden_layers * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
         * cfg.head_dim)
  split = [r["params"] for r in rows if r["name"] == "untied" and r["mesh"] == [1, 8, 1]
           and not r["critic"] and r["dtype"] == "float32"]
  assert split == [4 * ((full - rep) // 8 + rep)]


def test_kv_cache_bytes_equal_real_shards(sharded_measurements):
  rows = [r for r in sharded_measurements if "kv" in r]
  assert rows
  for r in rows:
    p = memory.plan(CONFIGS[r["name"]], mesh_shape=r["mesh"], micro_batch=8, seq_len=16,
                    rollout_batch=r["batch"], rollout_len=16, kv_dtype="bfloat16")
    assert p["components"]["kv_cache"]["bytes"] == r["kv"], r


def _residual_bytes(fn, *args):
  """Sum of what JAX saves for the backward pass, parsed from its public printout."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  sizes = {"f32": 4, "bf16": 2, "bool": 1, "i32": 4}
  total = 0
  for line in buf.getvalue().splitlines():
    if "from the argument" in line:  # the parameters themselves
      continue
    m = re.match(r"(\w+)\[([\d,]*)\]", line)
    total += sizes[m.group(1)] * math.prod(int(x) for x in m.group(2).split(",") if x)
  return total


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("remat", [True, False])
def test_saved_activations_match_jax_residuals(dtype, remat):
  b, t = 2, 48
  cfg = tiny(num_hidden_layers=3, dtype=dtype, remat=remat)
  params = jax.eval_shape(lambda r: qwen2.init_params(cfg, r), jax.random.key(0))
  tokens = jnp.zeros((b, t), jnp.int32)
  loss = lambda p: jnp.mean(qwen2.forward_hidden(p, tokens, cfg).astype(jnp.float32))
  real = _residual_bytes(loss, params)
  p = memory.plan(cfg, mesh_shape=(1, 1, 1), micro_batch=b, seq_len=t, compute_dtype=dtype,
                  remat="full" if remat else "none")
  estimate = p["components"]["saved_activations"]["bytes"]
  assert 0.9 * real <= estimate <= 1.1 * real, (real, estimate)


def test_remat_and_flash_change_what_they_should():
  cfg = qwen2.preset("qwen2.5-7b")
  kw = dict(mesh_shape=(1, 16, 4), micro_batch=16, seq_len=9216)
  full = memory.plan(cfg, remat="full", **kw)["components"]
  none = memory.plan(cfg, remat="none", **kw)["components"]
  flash = memory.plan(cfg, remat="full", flash_attention=True, **kw)["components"]
  b_t_d = 9216 * 3584 * 2  # one sequence per device, bf16
  assert full["saved_activations"]["bytes"] == 29 * b_t_d + 9216 * 3584 * 4
  assert none["saved_activations"]["bytes"] > 20 * full["saved_activations"]["bytes"]
  # 7 of 28 heads per device: flash attention removes the bf16 compute's (13 + 2) + (4 + 2) bytes
  # per attention score of one layer and keeps 4 bytes per query row.
  saved = (15 + 6) * 7 * 9216**2 - 4 * 7 * 9216
  assert full["layer_working_set"]["bytes"] - flash["layer_working_set"]["bytes"] == saved


def test_plan_structure_and_totals():
  cfg = CONFIGS["untied"]
  grpo = memory.plan(cfg, mesh_shape=(1, 2, 2), micro_batch=4, seq_len=32, rollout_batch=4)
  ppo = memory.plan(cfg, mesh_shape=(1, 2, 2), algorithm="ppo", micro_batch=4, seq_len=32,
                    rollout_batch=4, reference=True)
  assert not any(k.startswith("critic") for k in grpo["components"])
  assert {"critic_params", "critic_adamw_mu_nu", "critic_grads", "reference_params"} <= set(
      ppo["components"])
  for p in (grpo, ppo):
    t = p["totals"]
    assert t["peak"] == t["state"] + max(t["update"], t["rollout"])
    assert t["state"] == sum(v["bytes"] for v in p["components"].values()
                             if v["phase"] == "state")
  # f32 params + f32 AdamW mu, nu + f32 grads + f32 accumulator.
  assert grpo["bytes_per_param"] == 4 + 8 + 4 + 4
  lean = memory.plan(cfg, mesh_shape=(1, 1, 1), micro_batch=1, seq_len=8,
                     param_dtype="bfloat16", master_dtype="float32", grad_accum=False)
  assert lean["bytes_per_param"] == 2 + 4 + 8 + 2
  assert grpo["per_device_micro_batch"] == 2 and grpo["per_device_rollout_batch"] == 2


def test_bad_arguments_are_named():
  cfg = CONFIGS["untied"]
  with pytest.raises(ValueError, match="algorithm='dpo'"):
    memory.plan(cfg, mesh_shape=(1, 1, 1), algorithm="dpo", micro_batch=1, seq_len=8)
  with pytest.raises(ValueError, match="remat='some'"):
    memory.plan(cfg, mesh_shape=(1, 1, 1), remat="some", micro_batch=1, seq_len=8)
  with pytest.raises(ValueError, match="mesh_shape"):
    memory.plan(cfg, mesh_shape=(1, 8), micro_batch=1, seq_len=8)


def test_smallest_slice_is_the_first_that_fits():
  cfg = qwen2.preset("qwen2.5-7b")
  kw = dict(algorithm="ppo", seq_len=9216, flash_attention=True)
  chips, mesh, p = memory.smallest_slice(cfg, "v4", **kw)
  assert memory.fits(p, "v4") and math.prod(mesh) == chips
  smaller = [c for c in memory.SLICE_CHIPS["v4"] if c < chips][-1]
  for t in (1, 2, 4, 8):
    if smaller % t == 0:
      q = memory.plan(cfg, mesh_shape=(1, smaller // t, t), micro_batch=smaller // t,
                      rollout_batch=16 * smaller // t, **kw)
      assert not memory.fits(q, "v4")
  assert memory.accelerator_type("v4", 16) == "v4-32"
  assert memory.accelerator_type("v5e", 16) == "v5litepod-16"


def test_cli_prints_a_table(capsys):
  memory.main(["--preset", "qwen2.5-0.5b", "--mesh", "1,-1,2", "--chips", "8", "--chip", "v5e",
               "--algorithm", "ppo", "--seq_len", "2048"])
  out = capsys.readouterr().out
  assert "mesh=(1, 4, 2)" in out and "critic_adamw_mu_nu" in out and "total peak" in out
  memory.main(["--preset", "qwen2.5-0.5b", "--find_slice", "v5p", "--seq_len", "2048"])
  assert "| v5p | 95 GiB | v5p-8 |" in capsys.readouterr().out


def _trainer_config(**rl):
  import ml_collections
  c = ml_collections.ConfigDict()
  c.data = dict(prompts_per_step=4, max_prompt_len=16)
  c.rollout = dict(n=2, max_new_tokens=48, prompts_per_wave=0, engine="static", slots=0)
  c.rl = dict(algorithm="ppo", micro_batch_size=4, micro_batch_per_shard=0, mini_batch_size=8,
              logit_chunk=16, kl_coef=0.1)
  c.rl.update(rl)
  c.mesh = dict(rules=(("embed", None),))  # extra rules take precedence over the defaults
  return c


def test_plan_for_config_reads_the_trainer_settings(capsys):
  cfg = CONFIGS["untied"].replace(param_dtype="float32", dtype="bfloat16", remat=True)
  got = memory.print_plan_for_config(_trainer_config(), cfg, (1, 2, 2))
  want = memory.plan(cfg, mesh_shape=(1, 2, 2), algorithm="ppo", param_dtype="float32",
                     compute_dtype="bfloat16", opt_dtype="float32", nu_dtype="float32",
                     micro_batch=4, seq_len=64, remat="full", logits_chunk=16, reference=True,
                     reference_dtype="float32", rollout_batch=8, prompt_len=16,
                     rules=(("embed", None),) + memory.DEFAULT_RULES)
  assert got == want
  # With `embed` unsharded only tensor splits the parameters: the divisor is at most 2.
  assert got["components"]["actor_params"]["divisor"] <= 2
  assert "MiB/device" in capsys.readouterr().out
  # Rollouts decode one wave at a time: 2 prompts x 2 samples of KV cache, not the whole step's 8.
  waves = _trainer_config()
  waves.rollout.prompts_per_wave = 2
  in_waves = memory.plan_for_config(waves, cfg, (1, 2, 2))["components"]["kv_cache"]["bytes"]
  assert in_waves * 2 == got["components"]["kv_cache"]["bytes"]
  slots = _trainer_config()
  slots.rollout.update(engine="continuous", slots=4)  # the engine's slots bound the cache
  in_slots = memory.plan_for_config(slots, cfg, (1, 2, 2))["components"]["kv_cache"]["bytes"]
  assert in_slots == in_waves
  grpo = memory.plan_for_config(_trainer_config(algorithm="grpo", micro_batch_size=8, kl_coef=0.0),
                                cfg, (1, 2, 2))
  assert "critic_params" not in grpo["components"]
  assert "reference_params" not in grpo["components"] and "actor_grad_accum" not in grpo[
      "components"]


def test_micro_batch_rows_per_shard_and_global():
  """rl.micro_batch_per_shard scales with the mesh's batch shards; a global rl.micro_batch_size
  that the shards do not divide, or both keys set, is refused with the numbers."""
  import ml_collections
  rl = lambda size, per: ml_collections.ConfigDict(dict(micro_batch_size=size,
                                                        micro_batch_per_shard=per))
  assert memory.micro_batch_rows(rl(0, 1), (1, 32, 4)) == 32
  assert memory.micro_batch_rows(rl(0, 2), (2, 4, 1)) == 16
  assert memory.micro_batch_rows(rl(64, 0), (1, 8, 4)) == 64  # the old key keeps its meaning
  with pytest.raises(ValueError, match=r"micro_batch_size=8 \(global\) does not split over the 32"):
    memory.micro_batch_rows(rl(8, 0), (1, 32, 4))
  with pytest.raises(ValueError, match="exactly one"):
    memory.micro_batch_rows(rl(8, 1), (1, 8, 1))
  with pytest.raises(ValueError, match="exactly one"):
    memory.micro_batch_rows(rl(0, 0), (1, 8, 1))
  assert "1 per batch shard x 32 shards" in memory.describe_micro_batch(rl(0, 1), (1, 32, 4))
