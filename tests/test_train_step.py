"""The jitted RL step on a tiny random model: batch layout, accumulation, PPO, non-finite guard."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from explore_jax import rollout as rollout_lib
from explore_jax.config import defaults
from explore_jax.models import qwen2
from explore_jax.rl import actor_loss
from explore_jax.tpu import sharding
from explore_jax.train import state as train_state
from explore_jax.train import step as train_step

MODEL = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          rope_theta=1e4, tie_word_embeddings=True)


def _cfg(algorithm="grpo", micro=4, **loss):
  return train_step.StepConfig(
      model=MODEL, loss=actor_loss.LossConfig(**{"entropy_advantage": True, **loss}),
      algorithm=algorithm, group_size=4, norm_by_std=True, gamma=1.0, lam=1.0,
      whiten_advantages=False, value_clip=0.5, epochs=1, mini_batch_size=8,
      micro_batch_size=micro, logit_chunk=8, on_nonfinite="raise")


def _setup(algorithm="grpo", lr=1e-3, max_new_tokens=10):
  optim = defaults.base_config().optim
  tx = train_state.make_optimizer(train_state.lr_schedule(lr, optim, 100), optim)
  shapes, specs = train_state.abstract_state(MODEL, tx, tx, algorithm == "ppo")
  mesh = sharding.make_mesh((1, -1, 1))
  shard = train_state.state_shardings(shapes, specs, mesh, sharding.DEFAULT_RULES)
  params = qwen2.init_params(MODEL, jax.random.PRNGKey(0))
  state = train_state.init_state(MODEL, params, tx, tx, algorithm == "ppo", 0, shard)
  prompts = np.random.RandomState(0).randint(1, 64, (4, 6)).astype(np.int32)
  pmask = np.ones_like(prompts)
  pmask[0, :2] = 0
  rollout = rollout_lib.generate(MODEL, state.actor, prompts, pmask, jax.random.PRNGKey(1),
                                 max_new_tokens=max_new_tokens, eos_id=0, n=4)
  scores = jnp.asarray([1., -1., -1., 1., 1., 1., 1., 1., -1., -1., 1., -1., 1., 1., -1., -1.])
  return state, tx, rollout, scores


@pytest.fixture(scope="module")
def grpo_setup():
  return _setup("grpo")


def test_score_rollout_layout_and_advantages(grpo_setup):
  state, _, rollout, scores = grpo_setup
  batch, metrics = train_step.score_rollout(state, None, rollout, scores, cfg=_cfg())
  # The trainer's own log-probs of the sampled tokens match the sampler's (same weights, f32).
  mask = np.asarray(rollout.mask).astype(bool)
  np.testing.assert_allclose(np.asarray(batch["old_logprobs"])[mask],
                             np.asarray(rollout.logprobs)[mask], atol=2e-5)
  assert float(metrics["rollout/logprob_gap"]) < 2e-5
  # GRPO: one advantage per response, on its tokens only; group 1 (all +1) gets exactly 0.
  adv = np.asarray(batch["advantages"])
  assert np.all(adv[~mask] == 0)
  assert np.all(adv[4:8] == 0)
  r = np.asarray(scores[:4])
  expect = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
  for i in range(4):
    np.testing.assert_allclose(adv[i][mask[i]], expect[i], rtol=1e-5)
  assert batch["tokens"].shape == (16, 6 + 10)


def test_micro_batching_gives_the_same_update(grpo_setup):
  state, _, rollout, scores = grpo_setup
  tx = optax.sgd(1.0)  # the update is the gradient itself (Adam would hide a scale error)
  state = state.replace(actor_opt=tx.init(state.actor))
  outs = []
  for micro in (8, 2):
    cfg = _cfg(micro=micro)
    batch, _ = train_step.score_rollout(state, None, rollout, scores, cfg=cfg)
    copy = jax.tree.map(jnp.copy, state)  # update donates its state
    new, metrics = train_step.update(copy, batch, cfg=cfg, actor_tx=tx, critic_tx=tx,
                                     train_actor=True)
    outs.append((new, metrics))
  for new, metrics in outs[1:]:
    np.testing.assert_allclose(float(metrics["actor/loss"]), float(outs[0][1]["actor/loss"]),
                               rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(new.actor), jax.tree.leaves(outs[0][0].actor)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # And the update did change the actor.
  delta = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(outs[0][0].actor), jax.tree.leaves(state.actor)))
  assert delta > 1e-5
  assert int(outs[0][0].step) == int(state.step) + 1


def test_update_is_the_policy_gradient_of_an_independent_reference(grpo_setup):
  """One SGD step of the trainer (one mini-batch, ratio 1, no entropy term) moves the actor by
  lr * grad of mean_t A_t log pi(a_t), written here from full-vocabulary logits of the whole
  prompt + response sequence and the raw rewards, without the trainer's helpers."""
  state, _, rollout, scores = grpo_setup
  lr = 0.5
  tx = optax.sgd(lr)
  state = state.replace(actor_opt=tx.init(state.actor))
  cfg = dataclasses.replace(_cfg(entropy_advantage=False), mini_batch_size=16, micro_batch_size=8)
  batch, _ = train_step.score_rollout(state, None, rollout, scores, cfg=cfg)
  new, _ = train_step.update(jax.tree.map(jnp.copy, state), batch, cfg=cfg, actor_tx=tx,
                             critic_tx=tx, train_actor=True)

  tokens = np.concatenate([np.asarray(rollout.prompt_tokens), np.asarray(rollout.tokens)], 1)
  attn = np.concatenate([np.asarray(rollout.prompt_mask), np.asarray(rollout.mask)], 1)
  resp = np.asarray(rollout.mask).astype(np.float32)
  p = rollout.prompt_tokens.shape[1]
  r = np.asarray(scores).reshape(4, 4)  # prompt-major groups of 4
  adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)

  def objective(params):
    logits = qwen2.forward(params, jnp.asarray(tokens), MODEL, jnp.asarray(attn))
    logp = jax.nn.log_softmax(logits, axis=-1)
    taken = jnp.take_along_axis(logp[:, p - 1:-1], jnp.asarray(tokens[:, p:, None]), -1)[..., 0]
    return jnp.sum(adv[:, None] * resp * taken) / resp.sum()

  grad = jax.grad(objective)(state.actor)
  for a, b, g in zip(jax.tree.leaves(new.actor), jax.tree.leaves(state.actor),
                     jax.tree.leaves(grad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b) + lr * np.asarray(g), atol=2e-6)
  # The step is not vacuous: it raises the log-likelihood of the better responses.
  assert objective(new.actor) > objective(state.actor) + 1e-3


def test_first_update_loss_is_the_shaped_advantage_mean(grpo_setup):
  """Ratio = 1 on the first mini-batch, so its loss is -mean(A + psi) over its tokens."""
  state, tx, rollout, scores = grpo_setup
  cfg = dataclasses.replace(_cfg(), mini_batch_size=16, micro_batch_size=8)
  batch, _ = train_step.score_rollout(state, None, rollout, scores, cfg=cfg)
  logp, ent = train_step.response_logprobs(state.actor, batch["tokens"], batch["attn_mask"],
                                           batch["targets"], cfg)
  mask = np.asarray(batch["mask"]).astype(bool)
  a = np.asarray(batch["advantages"])
  psi = np.minimum(0.4 * np.asarray(ent), np.abs(a) / 2.0)
  expect = -np.sum(np.where(mask, a + psi, 0)) / mask.sum()
  _, metrics = train_step.update(jax.tree.map(jnp.copy, state), batch, cfg=cfg, actor_tx=tx,
                                 critic_tx=tx, train_actor=True)
  np.testing.assert_allclose(float(metrics["actor/loss"]), expect, rtol=1e-4)


def test_ppo_trains_the_critic_toward_the_returns():
  state, tx, rollout, scores = _setup("ppo", lr=3e-3)
  cfg = _cfg("ppo")
  losses_seen = []
  for _ in range(6):
    batch, m = train_step.score_rollout(state, None, rollout, scores, cfg=cfg)
    state, um = train_step.update(state, batch, cfg=cfg, actor_tx=tx, critic_tx=tx,
                                  train_actor=False)
    losses_seen.append(float(um["critic/vf_loss"]))
    assert "actor/loss" not in um  # critic warm-up: the actor is not updated
  # GAE with gamma = lambda = 1: returns are the sequence reward on every response token.
  mask = np.asarray(batch["mask"]).astype(bool)
  ret = np.asarray(batch["returns"])
  np.testing.assert_allclose(ret[mask], np.repeat(np.asarray(scores), mask.sum(1)), atol=1e-6)
  assert losses_seen[-1] < 0.8 * losses_seen[0]


def test_nonfinite_update_is_not_applied(grpo_setup):
  state, tx, rollout, scores = grpo_setup
  cfg = _cfg()
  batch, _ = train_step.score_rollout(state, None, rollout, scores, cfg=cfg)
  # Every mini-batch sees a NaN advantage (a NaN in one row only would skip one mini-batch).
  batch = dict(batch, advantages=batch["advantages"].at[:, 0].set(jnp.nan))
  before = jax.tree.map(np.asarray, state.actor)
  new, metrics = train_step.update(jax.tree.map(jnp.copy, state), batch, cfg=cfg, actor_tx=tx,
                                   critic_tx=tx, train_actor=True)
  assert float(metrics["actor/update_finite"]) == 0.0
  for a, b in zip(jax.tree.leaves(new.actor), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def _two_updates(grpo_setup, tx, plant=None):
  """The update of the module's rollout (16 rows: two mini-batch updates of 8) under `tx`, from
  the setup's state (with `plant(state)` applied): (state before, new state, metrics)."""
  state, _, rollout, scores = grpo_setup
  state = state.replace(actor_opt=tx.init(state.actor))
  if plant is not None:
    state = plant(state)
  batch, _ = train_step.score_rollout(state, None, rollout, scores, cfg=_cfg())
  before = jax.tree.map(np.asarray, state)
  new, metrics = train_step.update(jax.tree.map(jnp.copy, state), batch, cfg=_cfg(),
                                   actor_tx=tx, critic_tx=tx, train_actor=True)
  return before, new, {k: float(v) for k, v in metrics.items()}


def _where(metrics, state):
  names = train_step.nonfinite_names(state.actor, state.actor_opt)
  return names[int(metrics["actor/nonfinite_at"])]


def _assert_unchanged(new, before):
  for a, b in zip(jax.tree.leaves((new.actor, new.actor_opt)),
                  jax.tree.leaves((before.actor, before.actor_opt))):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_an_overflowing_learning_rate_never_lands(grpo_setup):
  """lr = 1e39 is inf in float32 (the config check refuses it; the step is called directly): the
  loss and the gradient are finite, the new parameters are not. Both updates are dropped, the
  parameters and AdamW's state (its count too) stay as they were."""
  optim = defaults.base_config().optim
  tx = train_state.make_optimizer(train_state.lr_schedule(1e39, optim, 100), optim)
  before, new, metrics = _two_updates(grpo_setup, tx)
  assert np.isfinite(metrics["actor/loss"]) and np.isfinite(metrics["actor/grad_norm"])
  assert metrics["actor/update_finite"] == 0.0 and metrics["actor/updates_dropped"] == 2.0
  assert _where(metrics, new).startswith("parameter model/")
  _assert_unchanged(new, before)
  assert int(new.step) == int(before.step) + 1  # the step itself is counted


def test_a_nan_in_an_adamw_moment_never_spreads(grpo_setup):
  """A NaN planted in one AdamW moment (as a corrupt checkpoint once restored) would make its
  parameter NaN; the update is dropped and names the moment."""
  optim = defaults.base_config().optim
  tx = train_state.make_optimizer(train_state.lr_schedule(1e-3, optim, 100), optim)

  def plant(state):
    mu = state.actor_opt[1][0].mu
    mlp = mu["model"]["layers_0"]["mlp"]
    mlp["down_proj"] = mlp["down_proj"].at[3, 5].set(jnp.nan)
    return state

  before, new, metrics = _two_updates(grpo_setup, tx, plant)
  assert metrics["actor/updates_dropped"] == 2.0
  where = _where(metrics, new)
  assert where == "optimizer state 1/0/mu/model/layers_0/mlp/down_proj", where
  _assert_unchanged(new, before)
  assert np.all(np.isfinite(np.concatenate([np.ravel(x) for x in jax.tree.leaves(new.actor)])))


def test_only_the_overflowing_mini_batch_is_dropped(grpo_setup):
  """A learning rate that is finite for the first optimizer step and inf for the second: the
  first mini-batch update lands, the second is dropped, the state is the one after the first
  (AdamW's count is 1)."""
  optim = defaults.base_config().optim
  tx = train_state.make_optimizer(lambda count: jnp.where(count == 0, 1e-3, jnp.inf), optim)
  before, new, metrics = _two_updates(grpo_setup, tx)
  assert metrics["actor/updates_dropped"] == 1.0 and metrics["actor/update_finite"] == 0.0
  assert int(new.actor_opt[1][0].count) == 1
  moved = max(float(np.max(np.abs(np.asarray(a) - b)))
              for a, b in zip(jax.tree.leaves(new.actor), jax.tree.leaves(before.actor)))
  assert 0 < moved < 1  # one step of lr 1e-3
  assert np.all(np.isfinite(np.concatenate([np.ravel(x) for x in jax.tree.leaves(new.actor)])))


def test_the_critic_update_is_guarded_too():
  """PPO's critic (here in its warm-up, the actor untouched) under an overflowing learning rate:
  both critic updates are dropped, its parameters and AdamW state stay as they were."""
  state, _, rollout, scores = _setup("ppo")
  optim = defaults.base_config().optim
  inf_tx = train_state.make_optimizer(train_state.lr_schedule(1e39, optim, 100), optim)
  state = state.replace(critic_opt=inf_tx.init(state.critic))
  batch, _ = train_step.score_rollout(state, None, rollout, scores, cfg=_cfg("ppo"))
  before = jax.tree.map(np.asarray, (state.critic, state.critic_opt))
  new, metrics = train_step.update(jax.tree.map(jnp.copy, state), batch, cfg=_cfg("ppo"),
                                   actor_tx=inf_tx, critic_tx=inf_tx, train_actor=False)
  assert float(metrics["critic/updates_dropped"]) == 2.0
  names = train_step.nonfinite_names(new.critic, new.critic_opt)
  assert names[int(metrics["critic/nonfinite_at"])].startswith("parameter ")
  for a, b in zip(jax.tree.leaves((new.critic, new.critic_opt)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_the_trainer_names_what_was_dropped_and_where():
  """The loop's check: in raise mode the message names the update, the quantity and the array,
  and says that nothing of the step was saved; in skip mode it warns and goes on."""
  import types

  from explore_jax.train import loop
  optim = defaults.base_config().optim
  tx = train_state.make_optimizer(train_state.lr_schedule(1e-3, optim, 100), optim)
  shapes, _ = train_state.abstract_state(MODEL, tx, tx, False)
  names = train_step.nonfinite_names(shapes.actor, shapes.actor_opt)
  at = names.index("parameter model/layers_0/mlp/down_proj")
  run = types.SimpleNamespace(shapes=shapes, optim=types.SimpleNamespace(updates_per_step=2),
                              config=types.SimpleNamespace(on_nonfinite="raise"))
  metrics = {"actor/loss": 0.5, "actor/nonfinite_at": float(at), "actor/updates_dropped": 1.0,
             "actor/update_finite": 0.0}
  with pytest.raises(FloatingPointError) as e:
    loop.check_finite(run, 7, metrics)
  assert ("step 7: actor: 1 of 2 mini-batch updates dropped, the first for a non-finite "
          "parameter model/layers_0/mlp/down_proj") in str(e.value)
  assert "nothing of step 7 was saved" in str(e.value)
  run.config.on_nonfinite = "skip"
  loop.check_finite(run, 7, metrics)  # a warning only
  loop.check_finite(run, 7, {**metrics, "actor/nonfinite_at": -1.0, "actor/updates_dropped": 0.0,
                             "actor/update_finite": 1.0})


def test_bucket_lengths():
  assert train_step.bucket_lengths(16, 1) == (16,)
  assert train_step.bucket_lengths(72, 4) == (24, 40, 56, 72)
  assert train_step.bucket_lengths(10, 4) == (8, 10)  # multiples of 8, never past P + N
  with pytest.raises(ValueError, match="length_buckets=0"):
    train_step.bucket_lengths(10, 0)


def _ragged(rollout):
  """The rollout with rows of very different lengths: prompts of 1-6 tokens, responses of 1-N."""
  rng = np.random.RandomState(3)
  r, n = rollout.tokens.shape
  p = rollout.prompt_tokens.shape[1]
  keep = np.arange(n)[None] < rng.randint(1, n + 1, r)[:, None]
  keep[:3] = np.arange(n)[None] < np.array([[1], [2], [n]])  # one full-length row at least
  pkeep = np.arange(p)[None] >= p - rng.randint(1, p + 1, r)[:, None]
  return rollout.replace(mask=jnp.asarray(keep, jnp.int32),
                         tokens=jnp.where(keep, rollout.tokens, 0),
                         logprobs=jnp.where(keep, rollout.logprobs, 0.0),
                         prompt_mask=jnp.asarray(pkeep, jnp.int32),
                         prompt_tokens=jnp.where(pkeep, rollout.prompt_tokens, 0))


@pytest.mark.parametrize("algorithm", ["ppo"])
def test_length_buckets_skip_padding_and_change_nothing(algorithm):
  """Rows sorted by length and micro-batches cut to the shortest of 4 lengths (8, 16, 24, 26): the
  same old log-probs, reference log-probs (KL), values and updated weights as computing every row
  at full length. PPO only: its actor update is GRPO's (the advantages come from outside the
  buckets), and it adds the critic's passes."""
  state, _, rollout, scores = _setup(algorithm, max_new_tokens=20)
  rollout = _ragged(rollout)
  ref = qwen2.init_params(MODEL, jax.random.PRNGKey(7))  # another policy: a nonzero KL
  tx = optax.sgd(0.5)
  state = state.replace(actor_opt=tx.init(state.actor), critic_opt=(
      tx.init(state.critic) if algorithm == "ppo" else state.critic_opt))
  results = []
  temp_bytes = []
  for buckets in (1, 4):
    cfg = dataclasses.replace(_cfg(algorithm, micro=2, kl_coef=0.1), length_buckets=buckets)
    assert train_step.bucket_lengths(26, buckets) == ((26,) if buckets == 1 else (8, 16, 24, 26))
    batch, _ = train_step.score_rollout(state, ref, rollout, scores, cfg=cfg)
    args = dict(cfg=cfg, actor_tx=tx, critic_tx=tx, train_actor=True)
    compiled = train_step.update.lower(state, batch, **args).compile()
    temp_bytes.append(compiled.memory_analysis().temp_size_in_bytes)
    new, metrics = compiled(jax.tree.map(jnp.copy, state), batch)
    results.append((batch, new, metrics))
  # The branches are alternatives, not all computed: no more scratch memory than one of them.
  assert temp_bytes[1] < 1.1 * temp_bytes[0], temp_bytes
  (b1, new1, m1), (b3, new3, m3) = results
  mask = np.asarray(b1["mask"]).astype(bool)
  fields = ["old_logprobs", "ref_logprobs", "advantages"]
  if algorithm == "ppo":
    fields += ["old_values", "returns"]
  for key in fields:
    np.testing.assert_allclose(np.asarray(b3[key])[mask], np.asarray(b1[key])[mask], atol=2e-5,
                               err_msg=key)
  # Padding was skipped: rows are 26 columns, and some micro-batches ran at fewer.
  assert float(m1["perf/update_length_frac"]) == 1.0
  assert float(m3["perf/update_length_frac"]) < 1.0
  np.testing.assert_allclose(float(m3["actor/loss"]), float(m1["actor/loss"]), rtol=1e-4)
  assert float(m1["actor/kl"]) > 1e-3
  trees = [(new1.actor, new3.actor, state.actor)]
  if algorithm == "ppo":
    trees.append((new1.critic, new3.critic, state.critic))
  for t1, t3, t0 in trees:
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(t1), jax.tree.leaves(t0)))
    assert moved > 1e-4
    for a, b in zip(jax.tree.leaves(t3), jax.tree.leaves(t1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
