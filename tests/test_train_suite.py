"""The exploration suite in the jitted step: the mini-batch statistics do not depend on how the
mini-batch is split (micro-batch size, length buckets, 8 devices, 2 processes), pass@k and the
rollout correction in the scoring pass, DAPO's dynamic sampling, and a short training run of
every suite variant through the trainer's command line."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from explore_jax.config import defaults
from explore_jax.rl import actor_loss as actor_lib
from explore_jax.rl import advantages as adv_lib
from explore_jax.rl import losses
from explore_jax.train import collect
from explore_jax.train import step as train_step
from test_train import REPO, read_metrics, run_train, train_env  # noqa: F401
from test_train_step import _cfg, _ragged, _setup

# Shares large enough that a 16-row rollout of the test model has several tokens selected; a
# band (lb, ub) its covariances fall in.
SUITE_LOSSES = {
    "clip_cov": dict(policy_loss="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.05,
                     clip_cov_ub=5.0, top_entropy_fraction=0.3, entropy_advantage=False),
    "kl_cov": dict(policy_loss="kl_cov", kl_cov_ratio=0.05, kl_cov_coef=1.0,
                   entropy_advantage=True),
}


def _suite_cfg(method, micro, buckets=1, **kw):
  cfg = _cfg(micro=micro, **{"entropy_advantage": False, **SUITE_LOSSES[method]})
  return dataclasses.replace(cfg, length_buckets=buckets, **kw)


@pytest.fixture(scope="module")
def ragged_setup():
  state, tx, rollout, scores = _setup("grpo", max_new_tokens=12)
  return state, tx, _ragged(rollout), scores


def _trained_once(state, tx, rollout, scores):
  """The state after one update of the plain loss: the policy then differs from the one that
  scored the rollout, so 'current' statistics differ from 'old' ones."""
  cfg = _cfg(entropy_advantage=False)
  batch, _ = train_step.score_rollout(state, None, rollout, scores, cfg=cfg)
  new, _ = train_step.update(jax.tree.map(jnp.copy, state), batch, cfg=cfg, actor_tx=tx,
                             critic_tx=tx, train_actor=True)
  return new


@pytest.mark.parametrize("method", sorted(SUITE_LOSSES))
def test_selections_do_not_depend_on_the_split(ragged_setup, method):
  """mini_batch_selections at micro-batch 1 and 8 (the whole mini-batch), and 2 with length
  buckets, select the same tokens: those of token_selections over a forward pass of the
  whole mini-batch at once."""
  state0, tx, rollout, scores = ragged_setup
  state = _trained_once(state0, tx, rollout, scores)  # the policy of a later mini-batch
  idx = jnp.asarray([13, 2, 7, 0, 9, 15, 4, 11])  # a mini-batch of 8 rows, shuffled
  rng = jax.random.PRNGKey(5)
  cfg = _suite_cfg(method, micro=8)
  batch, _ = train_step.score_rollout(state0, None, rollout, scores, cfg=cfg)
  mb = train_step._take(batch, idx)
  logp, ent = train_step.response_logprobs(state.actor, mb["tokens"], mb["attn_mask"],
                                           mb["targets"], cfg)
  want, want_m = actor_lib.token_selections(logp, ent, mb, cfg.loss, rng=rng, rows=idx)
  mask = np.asarray(mb["mask"]).astype(bool)
  for key, sel in want.items():  # the case is not vacuous
    assert 2 <= np.asarray(sel).sum() < mask.sum() // 2, (key, np.asarray(sel).sum())
  for micro, buckets in ((1, 1), (8, 1), (2, 3)):
    cfg = _suite_cfg(method, micro=micro, buckets=buckets)
    lengths = train_step._lengths(cfg, batch)
    got, got_m = jax.jit(lambda p, m: train_step.mini_batch_selections(
        p, m, idx, rng, cfg, lengths))(state.actor, mb)
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]),
                                    err_msg=f"{key} micro={micro} buckets={buckets}")
    for key in want_m:
      assert float(got_m[key]) == pytest.approx(float(want_m[key]))
  # "old" statistics come from the scoring pass's log-probs, which this policy no longer has.
  old, _ = train_step.mini_batch_selections(state.actor, mb, idx, rng,
                                            _suite_cfg(method, micro=2, token_stats="old"))
  assert any(not np.array_equal(np.asarray(old[k]), np.asarray(want[k])) for k in want)


def _sgd_update(state, rollout, scores, cfg, lr=0.5):
  tx = optax.sgd(lr)
  state = state.replace(actor_opt=tx.init(state.actor))
  batch, _ = train_step.score_rollout(state, None, rollout, scores, cfg=cfg)
  return train_step.update(jax.tree.map(jnp.copy, state), batch, cfg=cfg, actor_tx=tx,
                           critic_tx=tx, train_actor=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SUITE_LOSSES))
def test_update_is_the_same_at_any_micro_batch(ragged_setup, method):
  """Two mini-batch updates (SGD, so the update is the gradient itself): the same loss, shares
  and weights at micro-batch 8 as at 1 (with length buckets); the selection acts (a change of
  loss against the plain surrogate)."""
  state, _, rollout, scores = ragged_setup
  runs = [_sgd_update(state, rollout, scores, _suite_cfg(method, micro=m, buckets=b))
          for m, b in ((8, 1), (1, 3))]
  (new8, m8), (new1, m1) = runs
  keys = ["actor/loss", "actor/grad_norm"] + [k for k in m8 if k.endswith("_frac") and "cov" in k]
  keys += ["actor/top_entropy_frac"] if "actor/top_entropy_frac" in m8 else []
  for key in keys:
    np.testing.assert_allclose(float(m1[key]), float(m8[key]), rtol=2e-5, atol=1e-7,
                               err_msg=key)
  share = float(m8["actor/clip_cov_frac" if method == "clip_cov" else "actor/kl_cov_frac"])
  assert 0.01 < share < 0.2
  for a, b in zip(jax.tree.leaves(new1.actor), jax.tree.leaves(new8.actor)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
  plain, _ = _sgd_update(state, rollout, scores, _cfg(micro=8, entropy_advantage=False))
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(plain.actor), jax.tree.leaves(new8.actor)))
  assert moved > 1e-4  # the suite's loss is not the plain surrogate's


# Clip-Cov (the paper's recipe, with a share and band that select several tokens of the test
# model's ~100-token mini-batches) and the top-entropy mask in one run: both statistics at once;
# with DAPO's dynamic sampling, whose decisions every process must take alike.
SPLIT_RUN = ["--config.total_steps=2", "--config.checkpoint_every=2", "--config.export_hf=False",
             "--config.rl.clip_cov_ratio=0.05", "--config.rl.clip_cov_lb=0.05",
             "--config.rl.top_entropy_fraction=0.3", "--config.rl.filter_groups=True"]
SPLIT_KEYS = ("actor/loss", "actor/grad_norm", "actor/clip_cov_frac",
              "actor/clip_cov_candidate_frac", "actor/top_entropy_frac", "reward/mean",
              "rollout/entropy", "rollout/filter_rounds", "rollout/groups_kept_frac")


@pytest.mark.slow
def test_one_device_eight_devices_and_two_processes_select_alike(train_env, tmp_path):  # noqa: F811
  """The trainer's command line, 2 steps of clip_cov + top-entropy (+ dynamic sampling): one
  device at micro-batch 1; a (2, 2, 2) mesh of 8 fake devices (rows over 4 batch shards) at
  micro-batch 4 with length buckets and the static engine; 2 processes x 2 devices at
  micro-batch 4. The same losses and selected shares: the statistics are over the global
  mini-batch, not a micro-batch, a device or a process."""
  from test_multihost import launch_two
  from test_train import _command
  run_train(train_env, tmp_path / "one", variant="clip_cov",
            overrides=SPLIT_RUN + ["--config.rl.micro_batch_size=1"])
  run_train(train_env, tmp_path / "eight", variant="clip_cov", devices=8, overrides=SPLIT_RUN + [
      "--config.mesh.shape=(2,2,2)", "--config.rl.micro_batch_size=4",
      "--config.rl.length_buckets=3", "--config.rollout.engine=static"])
  cmd = _command(tmp_path / "two", "clip_cov", SPLIT_RUN + ["--config.rl.micro_batch_size=4"])
  launch_two([cmd, cmd], train_env, REPO)
  one = read_metrics(tmp_path / "one")
  assert all(r["actor/clip_cov_frac"] > 0.01 and r["actor/top_entropy_frac"] >= 0.3
             for r in one)
  assert max(r["rollout/filter_rounds"] for r in one) > 1  # more prompts were sampled
  for other in ("eight", "two"):
    rows = read_metrics(tmp_path / other)
    assert len(rows) == len(one) == 2
    for a, b in zip(one, rows):
      for key in SPLIT_KEYS:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-4, atol=2e-5,
                                   err_msg=f"{other} {key}")


def test_passk_advantages_in_the_scoring_pass(ragged_setup):
  state, _, rollout, scores = ragged_setup
  correct = (scores > 0).astype(jnp.float32)
  cfg = dataclasses.replace(_cfg(), passk_k=2)
  batch, _ = train_step.score_rollout(state, None, rollout, scores, correct, cfg=cfg)
  want = adv_lib.per_token(adv_lib.passk_advantages(correct, 4, k=2), rollout.mask)
  np.testing.assert_allclose(np.asarray(batch["advantages"]), np.asarray(want), rtol=1e-6)
  assert np.abs(np.asarray(want)).sum() > 0
  with pytest.raises(ValueError, match="needs `correct`"):
    train_step.score_rollout(state, None, rollout, scores, cfg=cfg)


def test_rollout_correction_in_the_scoring_pass(ragged_setup):
  """A sampler whose log-probs are off by up to 1.5 nats: weights min(rho, cap) in the batch
  and the loss, and in token_mask mode the dropped tokens leave the mask (and the token-mean's
  denominator) as in verl's rejection."""
  state, tx, rollout, scores = ragged_setup
  noise = np.random.default_rng(0).uniform(-1.5, 1.5, rollout.logprobs.shape)
  off = rollout.replace(logprobs=rollout.logprobs + jnp.asarray(noise, jnp.float32))
  mask = np.asarray(rollout.mask).astype(bool)
  for mode in ("token", "token_mask"):
    cfg = dataclasses.replace(_cfg(micro=8, entropy_advantage=False), tis_cap=2.0, tis_mode=mode,
                              mini_batch_size=16)
    batch, m = train_step.score_rollout(state, None, off, scores, cfg=cfg)
    rho = np.exp(np.asarray(batch["old_logprobs"]) - np.asarray(off.logprobs))
    if mode == "token":
      np.testing.assert_allclose(np.asarray(batch["tis_weights"])[mask],
                                 np.minimum(rho, 2.0)[mask], rtol=1e-5)
      assert 0 < m["rollout/tis_capped_frac"] < 1 and m["rollout/tis_dropped_frac"] == 0
      np.testing.assert_array_equal(np.asarray(batch["mask"]).astype(bool), mask)
      keep, w = mask, np.minimum(rho, 2.0)
    else:
      keep = mask & (rho >= 0.5) & (rho <= 2.0)
      np.testing.assert_array_equal(np.asarray(batch["mask"]).astype(bool), keep)
      assert float(m["rollout/tis_dropped_frac"]) == pytest.approx(1 - keep.sum() / mask.sum())
      w = keep.astype(np.float64)
    # The first update's loss (ratio 1): -sum(w A) / (kept tokens).
    adv = np.asarray(batch["advantages"])
    _, um = train_step.update(jax.tree.map(jnp.copy, state), batch, cfg=cfg, actor_tx=tx,
                              critic_tx=tx, train_actor=True)
    np.testing.assert_allclose(float(um["actor/loss"]), -(w * adv)[keep].sum() / keep.sum(),
                               rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# DAPO: overlong shaping and dynamic sampling
# --------------------------------------------------------------------------------------------------


def _config(**rl):
  c = ml_collections.ConfigDict(dict(
      rollout=dict(n=2, max_new_tokens=100), data=dict(prompts_per_step=3),
      reward=dict(overlong_buffer=20, overlong_penalty=0.5, correct=1.0),
      rl=dict(filter_max_rounds=3, **rl)))
  return c


def test_overlong_shaping():
  graded = np.array([1.0, -1.0, 1.0, 1.0], np.float32)
  got = collect.shaped_rewards(graded, np.array([10, 90, 80, 100]), _config())
  np.testing.assert_allclose(got, [1.0, -1.25, 1.0, 0.5])
  off = _config()
  off.reward.overlong_buffer = 0
  np.testing.assert_array_equal(collect.shaped_rewards(graded, np.array([100] * 4), off), graded)


def _fake_sampler(rounds_scores):
  """sample(records, rng) returning designed rewards, one list per round; rows carry (round,
  row) in their 'rollout' so the test can see which were kept."""
  calls = []

  def sample(records, rng):
    r = len(calls)
    calls.append((records, rng))
    s = np.asarray(rounds_scores[r], np.float32)
    ids = jnp.asarray(np.stack([np.full(len(s), r), np.arange(len(s))], 1))
    return collect.Experience(ids, jnp.asarray(s), jnp.asarray(s > 0, jnp.float32), 0.1 * r,
                              {"rollout": 1.0, "reward": 0.5, "slot_utilization": 0.9,
                               "retry_frac": 0.0})
  return sample, calls


def test_dynamic_sampling_keeps_groups_with_signal_in_order():
  # Groups of 2: round 0 has signal in group 1 only, round 1 in groups 0 and 2.
  sample, calls = _fake_sampler([[1, 1, 1, -1, -1, -1], [1, -1, 1, 1, -1, 1], [1, -1] * 3])
  more = iter([["b1"], ["b2"]])
  exp = collect.sample_with_signal(sample, ["b0"], lambda: next(more), jax.random.PRNGKey(0),
                                   _config())
  assert [c[0] for c in calls] == [["b0"], ["b1"]]  # stopped once 3 groups had signal
  assert not np.array_equal(np.asarray(calls[0][1]), np.asarray(calls[1][1]))  # fresh key
  np.testing.assert_array_equal(np.asarray(exp.rollout),
                                [[0, 2], [0, 3], [1, 0], [1, 1], [1, 4], [1, 5]])
  np.testing.assert_array_equal(np.asarray(exp.scores), [1, -1, 1, -1, -1, 1])
  np.testing.assert_array_equal(np.asarray(exp.correct), [1, 0, 1, 0, 0, 1])
  assert exp.timing["filter_rounds"] == 2 and exp.timing["rollout"] == 2.0
  assert exp.timing["groups_kept_frac"] == pytest.approx(3 / 6)
  assert exp.timing["groups_without_signal"] == 0


def test_dynamic_sampling_fills_with_groups_without_signal_after_the_last_round():
  sample, calls = _fake_sampler([[1, 1, -1, -1, 1, -1]] + [[1, 1] * 3] * 2)
  more = iter([["b1"], ["b2"]])
  exp = collect.sample_with_signal(sample, ["b0"], lambda: next(more), jax.random.PRNGKey(0),
                                   _config())
  assert len(calls) == 3
  # The one group with signal, then the first groups without, in sampling order.
  np.testing.assert_array_equal(np.asarray(exp.rollout)[:, 0], [0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(exp.rollout)[:, 1], [4, 5, 0, 1, 2, 3])
  assert exp.timing["groups_without_signal"] == 2
  assert exp.timing["groups_kept_frac"] == pytest.approx(1 / 9)


# --------------------------------------------------------------------------------------------------
# Configuration and the trainer's command line
# --------------------------------------------------------------------------------------------------


def test_every_config_takes_every_suite_variant():
  from explore_jax.train import setup
  from explore_jax.models import qwen2
  for variant in defaults.SUITE_VARIANTS:
    c = defaults.countdown_testbed("test")
    defaults.apply_variant(c, variant)
    assert not c.rl.entropy_advantage
    cfg = setup.step_config(c, qwen2.Qwen2Config(vocab_size=64, hidden_size=32,
                                                 intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=1))
    assert cfg.loss.selects_tokens == (variant in ("clip_cov", "kl_cov", "top_entropy"))
  c = defaults.base_config()
  defaults.apply_variant(c, "clip_cov")
  assert (c.rl.clip_low, c.rl.clip_high, c.rl.clip_cov_ratio) == (1.0, 1.0, 2e-4)
  c = defaults.base_config()
  defaults.apply_variant(c, "dapo")
  assert c.rl.filter_groups and c.reward.overlong_buffer == 8192 // 5
  from explore_jax.config import check
  c = defaults.base_config()
  c.rl.passk, c.rl.passk_k = True, 9
  with pytest.raises(ValueError, match="passk_k=9"):
    check.check_train_config(c)
  c.rl.passk, c.rl.tis_mode = False, "seq"
  with pytest.raises(ValueError, match="tis_mode='seq'"):
    check.check_train_config(c)
  c.rl.tis_mode, c.rl.tis_cap = "token_mask", 0.5
  with pytest.raises(ValueError, match="tis_cap=0.5: token_mask"):
    check.check_train_config(c)
  c.rl.tis_cap, c.rl.clip_cov_lb = 2.0, 6.0
  with pytest.raises(ValueError, match="clip_cov_lb=6.0: must be below rl.clip_cov_ub=5.0"):
    check.check_train_config(c)


# What each variant's metrics must show on the test model (2 steps, 16 rows of ~10 tokens).
VARIANT_CHECKS = {
    "clip_cov": lambda r: (0 < r["actor/clip_cov_frac"] <= r["actor/clip_cov_candidate_frac"]
                           and r["actor/clip_cov_frac"] < 0.05),
    "kl_cov": lambda r: 0 < r["actor/kl_cov_frac"] < 0.05 and r["actor/kl_cov_abs_kl"] >= 0,
    "top_entropy": lambda r: 0.2 <= r["actor/top_entropy_frac"] < 0.3,
    "passk": lambda r: r["rollout/advantage_abs_mean"] >= 0,
    "tis": lambda r: (abs(r["rollout/tis_weight_mean"] - 1) < 1e-3
                      and r["rollout/tis_weight_min"] > 0.99 and r["rollout/tis_dropped_frac"] == 0),
    "dapo": lambda r: (1 <= r["rollout/filter_rounds"] <= 10
                       and 0 <= r["rollout/groups_kept_frac"] <= 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", defaults.SUITE_VARIANTS)
def test_every_suite_variant_trains(train_env, tmp_path, variant):  # noqa: F811
  """configs/tiny_cpu.py:size=test,variant=NAME for 2 steps: the method's own metrics logged
  and in range, every metric finite (the trainer raises otherwise)."""
  workdir = tmp_path / variant
  run_train(train_env, workdir, variant=variant,
            overrides=["--config.total_steps=2", "--config.export_hf=False"])
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert VARIANT_CHECKS[variant](r), {k: v for k, v in r.items() if not k.startswith("perf")}


def test_the_suite_study_plan_and_its_share_table(tmp_path):
  """configs/demo.py:plan=suite has the seven arms, each resolving to a valid trainer config;
  the report's share table reads the runs' metrics (mean over steps, then seeds)."""
  import importlib.util
  from explore_jax.demo import study
  spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(REPO, "configs",
                                                                         "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("plan=suite")
  assert sorted(config.arms) == ["baseline", "clip_cov", "entropy_adv", "kl_cov", "passk",
                                 "placebo", "top_entropy"]
  assert config.seeds == 5 and config.eval.benchmarks.heldout.n == 128
  c = study.arm_config(config, "clip_cov", 3, "/base")
  assert c.rl.policy_loss == "clip_cov" and c.seed == 3 and not c.rl.entropy_advantage
  assert study.arm_config(config, "passk", 0, "/base").rl.passk
  for name, seeds in (("clip_cov", [[0.01, 0.03], [0.02, 0.02]]), ("baseline", [[0.0], [0.0]])):
    for seed, values in enumerate(seeds):
      run = tmp_path / "runs" / f"{name}_s{seed}"
      run.mkdir(parents=True)
      key = "actor/clip_cov_frac" if name == "clip_cov" else "actor/loss"
      (run / "metrics.jsonl").write_text("".join(
          f'{{"step": {i + 1}, "{key}": {v}}}\n' for i, v in enumerate(values)))
  shares = study.selected_shares(str(tmp_path), {"clip_cov": ["clip_cov_s0", "clip_cov_s1"],
                                                 "baseline": ["baseline_s0", "baseline_s1"]})
  assert list(shares) == ["clip_cov"]
  mean, lo, hi = shares["clip_cov"]["actor/clip_cov_frac"]
  assert (mean, lo, hi) == pytest.approx((0.02, 0.02, 0.02))
  assert "| clip_cov | Clip-Cov: tokens whose gradient is cut | 0.0200" in "\n".join(
      study.share_lines(shares))
