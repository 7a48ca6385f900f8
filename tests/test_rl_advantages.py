"""Advantages against slow float64 references (Python loops), and the properties of psi."""

import math
import statistics

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explore_jax.rl import advantages as A


def _grpo_reference(rewards, g, eps, norm_by_std):
  out = []
  for start in range(0, len(rewards), g):
    group = [float(r) for r in rewards[start:start + g]]
    mean = sum(group) / g
    std = statistics.stdev(group) if g > 1 else 0.0
    for r in group:
      if all(x == group[0] for x in group):
        out.append(0.0)
      else:
        out.append((r - mean) / (std + eps) if norm_by_std else r - mean)
  return np.array(out)


@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_python_loop(group_size, norm_by_std):
  rng = np.random.default_rng(group_size)
  binary = rng.choice([-1.0, 1.0], size=16 * group_size)  # the paper's +-1 rewards
  real = rng.normal(size=16 * group_size)
  for rewards in (binary, real):
    got = jax.jit(A.grpo_advantages, static_argnums=1, static_argnames="norm_by_std")(
        jnp.asarray(rewards, jnp.float32), group_size, norm_by_std=norm_by_std)
    want = _grpo_reference(rewards.astype(np.float32), group_size, 1e-6, norm_by_std)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


def test_grpo_equal_groups_are_exactly_zero():
  # 0.1 and 1/3 are not exact in binary: a naive r - mean leaves ~1e-8 residues for these.
  values = [0.1, 1 / 3, -1.0, 0.7, 1.0, 2.3e-3]
  for g in (3, 5, 7):
    rewards = jnp.asarray(np.repeat(values, g), jnp.float32)
    for norm in (True, False):
      got = np.asarray(A.grpo_advantages(rewards, g, norm_by_std=norm))
      assert np.all(got == 0.0), got
  mixed = jnp.array([0.1, 0.1, 0.1, 1.0, 0.0, 0.0], jnp.float32)
  got = np.asarray(A.grpo_advantages(mixed, 3))
  assert np.all(got[:3] == 0.0) and np.all(got[3:] != 0.0)


def test_grpo_rejects_bad_group_size_and_vmaps():
  with pytest.raises(ValueError, match="group_size=3"):
    A.grpo_advantages(jnp.zeros(8), 3)
  rewards = jnp.asarray(np.random.default_rng(0).normal(size=(5, 12)), jnp.float32)
  batched = jax.vmap(lambda r: A.grpo_advantages(r, 4))(rewards)
  for i in range(5):
    np.testing.assert_allclose(batched[i], A.grpo_advantages(rewards[i], 4), rtol=1e-6)


def _gae_reference(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards, dtype=np.float64)
  ret = np.zeros_like(rewards, dtype=np.float64)
  for b in range(rewards.shape[0]):
    steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
    next_value, next_adv = 0.0, 0.0
    for t in reversed(steps):
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      adv[b, t] = delta + gamma * lam * next_adv
      ret[b, t] = adv[b, t] + values[b, t]
      next_value, next_adv = values[b, t], adv[b, t]
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gae_matches_python_loop(gamma, lam, contiguous):
  rng = np.random.default_rng(int(gamma * 100 + lam * 10 + contiguous))
  b, t = 6, 11
  rewards = rng.normal(size=(b, t))
  values = rng.normal(size=(b, t))
  if contiguous:
    lengths = np.array([0, 1, 5, 11, 7, 3])
    mask = np.arange(t)[None, :] < lengths[:, None]
  else:
    mask = rng.random((b, t)) < 0.6
  got_adv, got_ret = jax.jit(lambda r, v, m: A.gae(r, v, m, gamma=gamma, lam=lam))(
      jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask))
  want_adv, want_ret = _gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got_adv)[~mask] == 0.0)


def test_gae_of_terminal_reward_with_gamma_one_is_reward_minus_value():
  # With gamma = lam = 1 and one terminal reward, A_t = R - V_t: the textbook identity.
  mask = jnp.asarray(np.arange(8)[None, :] < np.array([[5], [8]]))
  scores = jnp.array([1.0, -1.0])
  rewards = jax.jit(A.reward_at_last_token)(scores, mask)
  np.testing.assert_array_equal(np.asarray(rewards)[0], [0, 0, 0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(rewards)[1], [0] * 7 + [-1])
  values = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8)), jnp.float32)
  adv, ret = A.gae(rewards, values, mask)
  want = np.where(mask, np.asarray(scores)[:, None] - np.asarray(values), 0.0)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, np.where(mask, np.asarray(scores)[:, None], 0.0), atol=1e-6)


def test_gae_vmaps_over_a_leading_axis():
  rng = np.random.default_rng(2)
  r, v = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  m = rng.random((3, 4, 6)) < 0.7
  adv, _ = jax.vmap(lambda r, v, m: A.gae(r, v, m, gamma=0.9, lam=0.8))(r, v, m)
  for i in range(3):
    np.testing.assert_allclose(adv[i], _gae_reference(r[i], v[i], m[i], 0.9, 0.8)[0], atol=1e-5)


def test_whiten_and_per_token_match_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(2.0, 3.0, size=(4, 9))
  mask = rng.random((4, 9)) < 0.5
  got = jax.jit(A.whiten)(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
  sel = x[mask]
  want = np.where(mask, (x - sel.mean()) / np.sqrt(sel.var() + 1e-8), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = A.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask), shift_mean=False)
  np.testing.assert_allclose(got, np.where(mask, x / np.sqrt(sel.var() + 1e-8), 0.0), rtol=1e-5)
  seq = np.array([0.5, -1.0, 0.0, 2.0])
  np.testing.assert_array_equal(jax.jit(A.per_token)(jnp.asarray(seq), jnp.asarray(mask)),
                                np.where(mask, seq[:, None], 0.0).astype(np.float32))


# -- psi, the paper's term -------------------------------------------------------------------------

_floats = dict(allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
_arrays = hnp.arrays(np.float32, st.sampled_from([1, 6, 32]),  # few shapes: few compilations
                     elements=st.floats(-50, 50, **_floats))


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)  # same cases anywhere
@hypothesis.given(
    adv=_arrays,
    seed=st.integers(0, 2**31 - 1),
    alpha=st.floats(0.0, 5.0, **_floats),
    kappa=st.floats(1.0, 20.0, exclude_min=True, **_floats),
    zero_frac=st.floats(0.0, 1.0),
)
def test_psi_properties(adv, seed, alpha, kappa, zero_frac):
  rng = np.random.default_rng(seed)
  adv = np.where(rng.random(adv.shape) < zero_frac, 0.0, adv).astype(np.float32)
  entropy = rng.exponential(2.0, size=adv.shape).astype(np.float32)
  entropy[rng.random(adv.shape) < 0.2] = 0.0
  psi = np.asarray(A.entropy_advantage(jnp.asarray(adv), jnp.asarray(entropy), alpha=alpha,
                                       kappa=kappa))
  assert np.all(psi >= 0)
  # XLA divides by a constant as a multiply by its reciprocal: allow those ~1.5 ulp of rounding.
  assert np.all(psi <= np.abs(adv) / np.float32(kappa) * (1 + 3e-7))
  assert np.all(psi[adv == 0] == 0)
  nz = adv != 0
  assert np.all(np.sign(adv[nz] + psi[nz]) == np.sign(adv[nz]))
  want = np.minimum(np.float64(alpha) * entropy, np.abs(adv.astype(np.float64)) / kappa)
  np.testing.assert_allclose(psi, want, rtol=1e-6, atol=1e-30)


def test_psi_has_no_gradient_through_entropy_and_jits_with_traced_coefficients():
  adv = jnp.array([1.0, -0.5, 0.0, 2.0])
  ent = jnp.array([0.3, 4.0, 1.0, 10.0])
  d_ent = jax.grad(lambda h: jnp.sum(A.entropy_advantage(adv, h, alpha=0.4, kappa=2.0)))(ent)
  np.testing.assert_array_equal(d_ent, np.zeros(4))
  f = jax.jit(lambda a, h, alpha, kappa: A.entropy_advantage(a, h, alpha=alpha, kappa=kappa))
  # min(0.4 * 0.3, 0.5), min(1.6, 0.25), 0, min(4, 1)
  np.testing.assert_allclose(f(adv, ent, 0.4, 2.0), [0.12, 0.25, 0.0, 1.0], rtol=1e-6)
  # A tiny negative float32 entropy must not make psi negative.
  assert float(A.entropy_advantage(jnp.array([1.0]), jnp.array([-1e-7]), alpha=1.0,
                                   kappa=2.0)[0]) == 0.0
  assert math.isfinite(float(f(adv, ent, 0.0, 2.0).sum()))
