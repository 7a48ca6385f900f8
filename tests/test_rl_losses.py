"""Losses and the actor loss against float64 NumPy references; the gradient test of the paper."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from explore_jax.rl import advantages as A
from explore_jax.rl import losses as L
from explore_jax.rl.actor_loss import (LossConfig, actor_loss, actor_loss_from_hidden,
                                       actor_loss_from_logprobs)

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _np_log_softmax(z):
  z = z.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_entropy(z):
  logp = _np_log_softmax(z)
  return -(np.exp(logp) * logp).sum(-1)


def _np_aggregate(x, mask, agg, num_tokens=None, num_seqs=None):
  x = np.where(mask, x, 0.0).astype(np.float64)
  if agg == "token-mean":
    n = mask.sum() if num_tokens is None else num_tokens
    return x.sum() / max(n, 1)
  rows = []
  for b in range(x.shape[0]):
    length = mask[b].sum()
    if length:
      rows.append(x[b].sum() / (length if agg == "seq-mean-token-mean" else 1))
  s = len(rows) if num_seqs is None else num_seqs
  return sum(rows) / max(s, 1)


def _random_batch(seed, b=4, t=9, v=11, garbage=True):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, t + 1, size=b)
  mask = np.arange(t)[None, :] < lengths[:, None]
  logits = rng.normal(0, 2, size=(b, t, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t))
  old = (_np_log_softmax(logits)[np.arange(b)[:, None], np.arange(t), targets]
         + rng.normal(0, 0.3, size=(b, t))).astype(np.float32)
  adv = np.repeat(rng.choice([-1.0, 1.0, 0.0], size=b)[:, None] * rng.uniform(0.5, 2, (b, 1)), t,
                  axis=1).astype(np.float32)
  if garbage:  # padding positions hold values that must never leak into a loss or gradient
    old = np.where(mask, old, 1e30).astype(np.float32)
    adv = np.where(mask, adv, np.nan).astype(np.float32)
  batch = dict(targets=jnp.asarray(targets), mask=jnp.asarray(mask), old_logprobs=jnp.asarray(old),
               advantages=jnp.asarray(adv),
               ref_logprobs=jnp.asarray((old - rng.normal(0, 0.5, (b, t))).astype(np.float32)))
  return jnp.asarray(logits), batch


# -- entropy and log-probs -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_entropy_and_logprobs_match_float64(dtype):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 4, size=(3, 5, 1000)) + 30.0, dtype)  # offset: stability
  targets = jnp.asarray(rng.integers(0, 1000, size=(3, 5)))
  z64 = np.asarray(logits.astype(jnp.float32), np.float64)  # the bf16 values, exactly
  logp, ent = jax.jit(L.logprobs_and_entropy)(logits, targets)
  assert logp.dtype == ent.dtype == jnp.float32
  np.testing.assert_allclose(ent, _np_entropy(z64), rtol=1e-5, atol=1e-5)
  want_logp = np.take_along_axis(_np_log_softmax(z64), np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(L.entropy_from_logits(logits), _np_entropy(z64), rtol=1e-5, atol=1e-5)


def test_entropy_with_banned_tokens_is_finite_with_finite_gradient():
  logits = jnp.array([[0.5, -jnp.inf, 1.0, -jnp.inf], [3.0, 3.0, 3.0, 3.0]])
  np.testing.assert_allclose(jax.jit(L.entropy_from_logits)(logits),
                             [_np_entropy(np.array([0.5, 1.0])), np.log(4)], rtol=1e-6)
  grad = jax.jit(jax.grad(lambda z: L.entropy_from_logits(z).sum()))(logits)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("chunk", [1, 4, 13, 20])  # T = 13: ragged, exact, one, larger than T
def test_chunked_entropy_equals_unchunked_values_and_gradients(chunk):
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(0, 2, size=(2, 13, 17)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(2, 13)), jnp.float32)
  full = lambda z: jnp.sum(weights * L.entropy_from_logits(z))
  chunked = lambda z: jnp.sum(weights * L.entropy_from_logits_chunked(z, chunk=chunk))
  np.testing.assert_allclose(jax.jit(chunked)(logits), jax.jit(full)(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(chunked))(logits), jax.jit(jax.grad(full))(logits),
                             rtol=1e-5, atol=1e-7)


def _all_shapes(jaxpr):
  """Every intermediate shape of a jaxpr, recursing into scan / checkpoint / pjit bodies."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _all_shapes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _all_shapes(sub)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logprobs_from_hidden_chunked_equal_unchunked_and_float64(dtype):
  rng = np.random.default_rng(2)
  b, t, d, v, c = 2, 10, 8, 37, 3
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
  w_out = jnp.asarray(rng.normal(size=(d, v)), dtype)
  targets = jnp.asarray(rng.integers(0, v, size=(b, t)))
  z64 = np.asarray(hidden, np.float64) @ np.asarray(w_out, np.float64)
  logp, ent = jax.jit(functools.partial(L.token_logprobs_and_entropy, chunk=c))(hidden, w_out,
                                                                                 targets)
  want_logp = np.take_along_axis(_np_log_softmax(z64), np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, _np_entropy(z64), rtol=1e-5, atol=1e-5)

  def scalar(h, w, chunk):
    lp, h_ = L.token_logprobs_and_entropy(h, w, targets, chunk=chunk)
    return jnp.sum(lp * 0.7 + h_ * 1.3)

  grad_fn = jax.jit(jax.grad(scalar, argnums=(0, 1)), static_argnums=2)
  g_chunk, g_full = grad_fn(hidden, w_out, c), grad_fn(hidden, w_out, None)
  for a, b_ in zip(g_chunk, g_full):
    a, b_ = np.asarray(a, np.float32), np.asarray(b_, np.float32)
    # bfloat16 gradients round differently when the matmul is split: compare at bf16 resolution.
    atol = 1.6e-2 * np.abs(b_).max() if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=atol)
  # Neither pass of the chunked gradient forms anything the size of the full [B, T, V] logits.
  jaxpr = jax.make_jaxpr(jax.grad(scalar, argnums=(0, 1)), static_argnums=2)(hidden, w_out, c)
  assert max(np.prod(s, dtype=int) for s in _all_shapes(jaxpr.jaxpr)) < b * t * v / 2
  jaxpr = jax.make_jaxpr(jax.grad(scalar, argnums=(0, 1)), static_argnums=2)(hidden, w_out, None)
  assert max(np.prod(s, dtype=int) for s in _all_shapes(jaxpr.jaxpr)) >= b * t * v  # sanity


# -- aggregation, policy loss, value loss, KL ------------------------------------------------------


def _np_policy_loss(logp, old, adv, mask, clip_low, clip_high, clip_c, agg):
  per_token = np.zeros(mask.shape)
  clipped_flags = np.zeros(mask.shape)
  for b, t in zip(*np.nonzero(mask)):
    ratio = np.exp(np.float64(logp[b, t]) - np.float64(old[b, t]))
    a = np.float64(adv[b, t])
    surrogate = max(-a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high))
    clipped_flags[b, t] = -a * min(max(ratio, 1 - clip_low), 1 + clip_high) > -a * ratio
    if clip_c is not None and a < 0:
      surrogate = min(surrogate, -a * clip_c)
    per_token[b, t] = surrogate
  return _np_aggregate(per_token, mask, agg), clipped_flags[mask].mean()


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_c", [None, 1.5])
def test_policy_loss_matches_numpy(agg, clip_c):
  logits, batch = _random_batch(3, garbage=True)
  rng = np.random.default_rng(4)
  mask = np.asarray(batch["mask"])
  old = np.asarray(batch["old_logprobs"])
  logp = np.where(mask, old + rng.normal(0, 0.4, mask.shape), -3.0).astype(np.float32)
  adv = np.where(mask, rng.normal(size=mask.shape), np.nan).astype(np.float32)
  fn = jax.jit(functools.partial(L.policy_loss, clip_c=clip_c, agg=agg))
  loss, metrics = fn(logp, old, adv, mask)
  want, want_clip = _np_policy_loss(logp, old, adv, mask, 0.2, 0.28, clip_c, agg)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["actor/clip_frac"], want_clip, rtol=1e-6)
  assert 0 < want_clip < 1  # the inputs exercise both branches
  ratio = np.exp(logp.astype(np.float64) - old)[mask]
  np.testing.assert_allclose(metrics["actor/approx_kl"], np.mean(ratio - 1 - np.log(ratio)),
                             rtol=1e-4)
  if clip_c is not None:  # dual clip changes the loss for A < 0 tokens with exploded ratios
    assert "actor/clip_frac_lower" in metrics
    no_dual, _ = _np_policy_loss(logp, old, adv, mask, 0.2, 0.28, None, agg)
    assert abs(no_dual - want) > 1e-3


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_sum_to_the_mini_batch_loss_and_gradient(agg):
  logits, batch = _random_batch(5, b=6, garbage=False)
  cfg = LossConfig(agg=agg, entropy_advantage=True, entropy_coef=0.01, kl_coef=0.05, clip_c=3.0)
  mask = np.asarray(batch["mask"])
  counts = dict(num_tokens=int(mask.sum()), num_seqs=int(mask.any(-1).sum()))
  loss, grad = jax.jit(jax.value_and_grad(lambda z: actor_loss(z, batch, cfg)[0]))(logits)

  def micro(z, i, counts):  # rows [2i, 2i + 2) of the mini-batch
    part = jax.tree.map(lambda x: x[2 * i:2 * i + 2], batch)
    return actor_loss(z[2 * i:2 * i + 2], part, cfg, **counts)[0]

  @jax.jit
  def accumulate(z):
    total = sum(micro(z, i, counts) for i in range(3))
    grad_sum = sum(jax.grad(micro)(z, i, counts) for i in range(3))
    # Micro-batches normalised by their own counts would not add up (the lengths differ).
    local = sum(micro(z, i, {}) for i in range(3))
    return total, grad_sum, local

  total, grad_sum, local = accumulate(logits)
  np.testing.assert_allclose(total, loss, rtol=1e-5)
  np.testing.assert_allclose(grad_sum, grad, rtol=1e-5, atol=1e-8)
  assert abs(float(local) - float(loss)) > 1e-3
  # The same accumulation as a vmap over stacked micro-batches, with traced counts.
  stacked = jax.tree.map(lambda x: x.reshape(3, 2, *x.shape[1:]), (logits, batch))
  losses_v = jax.jit(jax.vmap(lambda z, bt, n, s: actor_loss(z, bt, cfg, num_tokens=n,
                                                             num_seqs=s)[0],
                              in_axes=(0, 0, None, None)))(*stacked, counts["num_tokens"],
                                                            counts["num_seqs"])
  np.testing.assert_allclose(jnp.sum(losses_v), loss, rtol=1e-5)


def test_value_loss_matches_numpy():
  rng = np.random.default_rng(6)
  b, t = 5, 7
  mask = rng.random((b, t)) < 0.7
  v, v_old, ret = rng.normal(size=(3, b, t)).astype(np.float32)
  per_token = np.zeros((b, t))
  for i, j in zip(*np.nonzero(mask)):
    clipped = v_old[i, j] + np.clip(np.float64(v[i, j]) - v_old[i, j], -0.5, 0.5)
    per_token[i, j] = 0.5 * max((np.float64(v[i, j]) - ret[i, j])**2, (clipped - ret[i, j])**2)
  for agg in AGGS:
    loss, metrics = jax.jit(functools.partial(L.value_loss, agg=agg))(
        v, v_old, np.where(mask, ret, np.inf), mask)
    np.testing.assert_allclose(loss, _np_aggregate(per_token, mask, agg), rtol=1e-5)
  assert 0 < float(metrics["critic/vf_clip_frac"]) < 1
  grad = jax.grad(lambda x: L.value_loss(x, v_old, ret, mask)[0])(jnp.asarray(v))
  assert np.all(np.asarray(grad)[~mask] == 0) and np.any(np.asarray(grad)[mask] != 0)


def test_kl_penalty_matches_numpy_and_clamps():
  rng = np.random.default_rng(7)
  logp = rng.normal(-2, 1, size=(4, 6)).astype(np.float32)
  ref = (logp + rng.normal(0, 0.7, size=(4, 6))).astype(np.float32)
  d = ref.astype(np.float64) - logp
  want = {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - 1 - d}
  for kind, w in want.items():
    np.testing.assert_allclose(jax.jit(L.kl_penalty, static_argnums=2)(logp, ref, kind), w,
                               rtol=1e-4, atol=1e-6)
  # k3 is clamped at 10: a reference that likes a token e^40 times more (or e^59 times less) does
  # not blow up the loss, and sends no gradient; below the clamp the value and gradient are exact.
  logp, ref = jnp.array([-45.0, -1.0, -1.0]), jnp.array([-5.0, -60.0, -9.0])
  k3 = lambda x: L.kl_penalty(x, ref, "k3")
  np.testing.assert_allclose(k3(logp), [10.0, 10.0, np.exp(-8) + 7], rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: k3(x).sum())(logp), [0, 0, 1 - np.exp(-8)],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="k4"):
    L.kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")


# -- the actor loss --------------------------------------------------------------------------------


def test_entropy_advantage_gradient_equals_constant_shaped_advantage():
  """The paper's design: psi reweights tokens, it sends no gradient through H."""
  logits, batch = _random_batch(8, garbage=False)
  cfg = LossConfig(entropy_advantage=True, alpha=0.4, kappa=2.0)
  grad = jax.jit(jax.grad(lambda z: actor_loss(z, batch, cfg)[0]))(logits)

  _, entropy = L.logprobs_and_entropy(logits, batch["targets"])
  shaped = batch["advantages"] + A.entropy_advantage(batch["advantages"], entropy, alpha=0.4,
                                                      kappa=2.0)
  const = dict(batch, advantages=shaped)
  loss_grad = jax.jit(jax.grad(lambda z, b, c: actor_loss(z, b, c)[0]), static_argnums=2)
  grad_const = loss_grad(logits, const, LossConfig())
  np.testing.assert_allclose(grad, grad_const, rtol=1e-6, atol=1e-9)

  grad_plain = loss_grad(logits, batch, LossConfig())
  assert np.max(np.abs(grad - grad_plain)) > 1e-3  # psi did change the update

  # A regulariser -beta * H instead does send gradient through H: exactly -beta * dH (up to
  # float32 rounding of the policy-gradient part, ~1e-8 here against entropy terms ~1e-4).
  beta = 0.05
  entropy_grad = jax.jit(jax.grad(
      lambda z, agg: L.aggregate(L.entropy_from_logits(z), batch["mask"], agg)), static_argnums=1)
  for agg in AGGS:
    grad_reg = loss_grad(logits, batch, LossConfig(entropy_coef=beta, agg=agg))
    grad_base = loss_grad(logits, batch, LossConfig(agg=agg))
    d_entropy = entropy_grad(logits, agg)
    np.testing.assert_allclose(grad_reg - grad_base, -beta * d_entropy, rtol=1e-4, atol=1e-7)
    assert np.max(np.abs(beta * d_entropy)) > 1e-4


def test_actor_loss_terms_and_metrics():
  logits, batch = _random_batch(9, garbage=True)
  cfg = LossConfig(entropy_advantage=True, alpha=0.4, kappa=2.0, entropy_coef=0.01, kl_coef=0.1,
                   kl_kind="k2")
  loss, metrics = jax.jit(actor_loss, static_argnums=2)(logits, batch, cfg)
  mask = np.asarray(batch["mask"])
  logp64 = np.take_along_axis(_np_log_softmax(np.asarray(logits)),
                              np.asarray(batch["targets"])[..., None], -1)[..., 0]
  ent64 = _np_entropy(np.asarray(logits))
  adv = np.where(mask, np.asarray(batch["advantages"]), 0.0)
  psi = np.minimum(0.4 * ent64, np.abs(adv) / 2.0)
  pg, _ = _np_policy_loss(logp64, np.asarray(batch["old_logprobs"]), adv + psi, mask, 0.2, 0.28,
                          None, "token-mean")
  kl = 0.5 * (np.asarray(batch["ref_logprobs"]) - logp64)**2
  want = pg - 0.01 * _np_aggregate(ent64, mask, "token-mean") + 0.1 * _np_aggregate(kl, mask,
                                                                                    "token-mean")
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["actor/loss"], want, rtol=1e-5)
  np.testing.assert_allclose(metrics["actor/entropy"], ent64[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["actor/psi_mean"], psi[mask].mean(), rtol=1e-5)
  nz = mask & (adv != 0)
  np.testing.assert_allclose(metrics["actor/psi_over_abs_adv"], (psi[nz] / np.abs(adv[nz])).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["actor/kl"], kl[mask].mean(), rtol=1e-5)
  assert float(metrics["actor/num_tokens"]) == mask.sum()
  for key in ("actor/pg_loss", "actor/clip_frac", "actor/approx_kl", "actor/entropy_loss",
              "actor/kl_loss"):
    assert np.isfinite(metrics[key]), key


def test_actor_loss_metrics_finite_without_signal_or_tokens():
  logits, batch = _random_batch(10, garbage=False)
  cfg = LossConfig(entropy_advantage=True, kl_coef=0.1, entropy_coef=0.01)
  for b in (dict(batch, advantages=jnp.zeros_like(batch["advantages"])),
            dict(batch, mask=jnp.zeros_like(batch["mask"]))):
    (loss, metrics), grad = jax.jit(jax.value_and_grad(lambda z: actor_loss(z, b, cfg),
                                                       has_aux=True))(logits)
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics)), metrics
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert float(metrics["actor/psi_over_abs_adv"]) == 0.0


def test_actor_loss_from_hidden_equals_from_logits():
  rng = np.random.default_rng(11)
  _, batch = _random_batch(11, b=3, t=7, v=23, garbage=True)
  hidden = jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)
  w_out = jnp.asarray(rng.normal(size=(6, 23)), jnp.float32)
  cfg = LossConfig(entropy_advantage=True, entropy_coef=0.02)
  f_logits = lambda h, w: actor_loss(jnp.einsum("btd,dv->btv", h, w), batch, cfg)[0]
  f_hidden = lambda h, w: actor_loss_from_hidden(h, w, batch, cfg, chunk=3)[0]
  np.testing.assert_allclose(jax.jit(f_hidden)(hidden, w_out), jax.jit(f_logits)(hidden, w_out),
                             rtol=1e-5)
  for a, b in zip(jax.jit(jax.grad(f_hidden, (0, 1)))(hidden, w_out),
                  jax.jit(jax.grad(f_logits, (0, 1)))(hidden, w_out)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_config_and_batch_errors_name_the_field():
  with pytest.raises(ValueError, match="agg='mean'"):
    LossConfig(agg="mean")
  with pytest.raises(ValueError, match="clip_c=0.5"):
    LossConfig(clip_c=0.5)
  with pytest.raises(ValueError, match="kl_kind"):
    LossConfig(kl_kind="k5")
  logits, batch = _random_batch(12)
  with pytest.raises(ValueError, match="ref_logprobs"):
    no_ref = {k: v for k, v in batch.items() if k != "ref_logprobs"}
    actor_loss(logits, no_ref, LossConfig(kl_coef=0.1))
  with pytest.raises(ValueError, match="'advantages' has shape"):
    actor_loss(logits, dict(batch, advantages=batch["advantages"][:, 0]), LossConfig())
  lp = jnp.zeros(batch["mask"].shape)
  assert np.isfinite(actor_loss_from_logprobs(lp, lp, batch, LossConfig())[0])


def test_placebo_is_the_unclipped_offset_and_clip_binds_by_sign():
  """The placebo arm shapes A + alpha * sg(H) on every response token (no clip: also where A = 0),
  sends no gradient through H, and the clip-binding metrics count alpha * H > |A| / kappa on the
  tokens of responses above and below their group's mean, whichever arm runs."""
  logits, batch = _random_batch(11, b=16, garbage=False)
  mask = np.asarray(batch["mask"]).astype(bool)
  adv = np.asarray(batch["advantages"]).copy()
  adv[0] = 0.0  # a row without signal: the placebo still offsets it, psi does not
  batch = dict(batch, advantages=jnp.asarray(adv))
  placebo = LossConfig(entropy_advantage=True, entropy_clip=False, alpha=0.4, kappa=2.0)
  loss_grad = jax.jit(jax.grad(lambda z, b, c: actor_loss(z, b, c)[0]), static_argnums=2)
  ent64 = _np_entropy(np.asarray(logits))
  const = dict(batch, advantages=jnp.asarray(adv + 0.4 * ent64, jnp.float32))
  np.testing.assert_allclose(loss_grad(logits, batch, placebo), loss_grad(logits, const,
                                                                          LossConfig()),
                             rtol=1e-5, atol=1e-8)
  _, m_placebo = jax.jit(actor_loss, static_argnums=2)(logits, batch, placebo)
  np.testing.assert_allclose(m_placebo["actor/psi_mean"], (0.4 * ent64)[mask].mean(), rtol=1e-5)
  # Against the paper's psi, the placebo is larger exactly where the clip binds.
  for cfg in (LossConfig(), LossConfig(entropy_advantage=True, alpha=0.4, kappa=2.0), placebo):
    _, m = jax.jit(actor_loss, static_argnums=2)(logits, batch, cfg)
    binds = 0.4 * ent64 > np.abs(adv) / 2.0
    for sign, side in (("pos", adv > 0), ("neg", adv < 0)):
      want = binds[mask & side].mean()
      assert 0.0 < want < 1.0, (sign, want)  # both outcomes occur: the check can fail
      np.testing.assert_allclose(m[f"actor/psi_clip_binds_{sign}"], want, rtol=1e-5)
