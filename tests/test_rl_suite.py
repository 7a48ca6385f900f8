"""The exploration suite's pure functions against float64 NumPy references written from their
definitions (docs/exploration_suite.md), against verl's published Clip-Cov / KL-Cov procedures on
hand-made cases, and the gradients they must (not) send."""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explore_jax.rl import actor_loss as actor_lib
from explore_jax.rl import advantages as A
from explore_jax.rl import losses as L
from explore_jax.rl import selection as S

# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def np_cov(adv, logp, mask):
  m = mask.astype(bool)
  a, lp = adv.astype(np.float64), logp.astype(np.float64)
  return np.where(m, (a - a[m].mean()) * (lp - lp[m].mean()), 0.0)


def np_ppo_terms(logp, old, adv, clip_low, clip_high):
  r = np.exp(logp.astype(np.float64) - old)
  return -adv * r, -adv * np.clip(r, 1 - clip_low, 1 + clip_high)


def np_clip_cov_candidates(logp, old, adv, mask, lb, ub, clip_low, clip_high):
  unclipped, clipped = np_ppo_terms(logp, old, adv, clip_low, clip_high)
  cov = np_cov(adv, logp, mask)
  return mask & ~(clipped > unclipped) & (cov > lb) & (cov < ub)


def np_count(n, fraction, up):
  x = fractions.Fraction(str(fraction)) * n
  return math.ceil(x) if up else math.floor(x)


def np_kl_cov_select(adv, logp, mask, ratio):
  cov = np_cov(adv, logp, mask)
  k = max(1, np_count(int(mask.sum()), ratio, up=False))
  tokens = sorted((-cov[b, t], b, t) for b, t in zip(*np.nonzero(mask)))
  out = np.zeros(mask.shape, bool)
  for _, b, t in tokens[:k]:
    out[b, t] = True
  return out


def np_token_mean(x, mask):
  return np.where(mask, x, 0.0).sum() / max(mask.sum(), 1)


def np_passk(correct, g, k):
  out = []
  for start in range(0, len(correct), g):
    grp = [bool(c) for c in correct[start:start + g]]
    n_neg = grp.count(False)
    reward = 1 - math.comb(n_neg, k) / math.comb(g, k)
    sigma = math.sqrt(reward * (1 - reward))
    miss = math.comb(n_neg - 1, k - 1) / math.comb(g - 1, k - 1) if n_neg >= 1 else 0.0
    for c in grp:
      out.append(0.0 if sigma == 0 else ((1 - reward) if c else (1 - reward - miss)) / sigma)
  return np.array(out)


def _random_case(seed, b=6, t=12):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, t + 1, size=b)
  mask = np.arange(t)[None] < lengths[:, None]
  logp = np.log(rng.uniform(0.02, 1.0, (b, t))).astype(np.float32)
  old = (logp + rng.normal(0, 0.4, (b, t))).astype(np.float32)
  adv = np.repeat(rng.normal(0, 1.5, (b, 1)), t, axis=1).astype(np.float32)
  return logp, old, adv, mask


# --------------------------------------------------------------------------------------------------
# Counting, ordering, draws
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [2e-4, 0.002, 0.2, 0.3, 1e-6, 1.0])
def test_fraction_count_is_exact(fraction):
  ns = np.array([0, 1, 3, 5, 15, 4999, 5000, 5001, 123457, 2_000_000, 16_777_217, 2**31 - 1])
  for up in (True, False):
    got = np.asarray(S.fraction_count(jnp.asarray(ns, jnp.int32), fraction, round_up=up))
    np.testing.assert_array_equal(got, [np_count(int(n), fraction, up) for n in ns])


def test_fraction_must_be_a_share_to_a_millionth():
  for bad in (0.0, 1.5, -0.1, 1.5e-7):
    with pytest.raises(ValueError, match="fraction"):
      S.check_fraction(bad, "fraction")


def test_token_bits_depend_on_row_id_and_position_only():
  rng = jax.random.PRNGKey(3)
  whole = np.asarray(S.token_bits(rng, jnp.arange(10), 7))
  # Rows 7 and 2 alone, in another order, and in a wider array: the same bits.
  part = np.asarray(S.token_bits(rng, jnp.asarray([7, 2]), 9))
  np.testing.assert_array_equal(part[:, :7], whole[[7, 2]])
  assert len(np.unique(whole)) == whole.size  # no repeats among 70 draws of 32 bits
  assert not np.array_equal(np.asarray(S.token_bits(jax.random.PRNGKey(4), jnp.arange(10), 7)),
                            whole)


def test_first_k_breaks_ties_by_row_id_then_position():
  keys = jnp.asarray([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
  got = np.asarray(S.first_k((keys,), 2))
  np.testing.assert_array_equal(got, [[True, False, True], [False, False, False]])
  # With row ids (1, 0) the second row comes first among the ties.
  got = np.asarray(S.first_k((keys,), 2, rows=jnp.asarray([1, 0])))
  np.testing.assert_array_equal(got, [[False, False, False], [True, True, False]])


# --------------------------------------------------------------------------------------------------
# Pass@k advantage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g,k", [(4, 1), (4, 2), (8, 4), (16, 4), (16, 16), (5, 3)])
def test_passk_matches_the_closed_form(g, k):
  rng = np.random.default_rng(g * 10 + k)
  # Every count of incorrect answers 0..G at least once, plus random groups.
  groups = [np.r_[np.ones(g - j), np.zeros(j)] for j in range(g + 1)]
  groups += [rng.integers(0, 2, g) for _ in range(20)]
  correct = np.concatenate([rng.permutation(x) for x in groups]).astype(np.float32)
  got = np.asarray(jax.jit(A.passk_advantages, static_argnums=1, static_argnames="k")(
      jnp.asarray(correct), g, k=k))
  np.testing.assert_allclose(got, np_passk(correct, g, k), rtol=2e-5, atol=2e-6)


def test_passk_at_k1_is_grpo_with_the_population_std():
  rng = np.random.default_rng(0)
  correct = rng.integers(0, 2, 64).astype(np.float32)
  got = np.asarray(A.passk_advantages(jnp.asarray(correct), 8, k=1))
  r = correct.reshape(-1, 8).astype(np.float64)
  std = r.std(axis=1, keepdims=True)  # population std, no epsilon
  want = np.where(std > 0, (r - r.mean(1, keepdims=True)) / np.where(std > 0, std, 1), 0)
  np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-5, atol=1e-6)
  # ... which is not the project's GRPO (unbiased std + 1e-6) on the same rewards.
  grpo = np.asarray(A.grpo_advantages(jnp.asarray(correct), 8))
  assert np.max(np.abs(grpo - got)) > 0.05


def test_passk_signs_and_zero_groups():
  # k = 4 of G = 8: a group with fewer than 4 incorrect has R = 1 and no signal.
  correct = jnp.asarray([1, 1, 1, 1, 1, 0, 0, 0] + [1, 0, 0, 0, 0, 0, 0, 0], jnp.float32)
  adv = np.asarray(A.passk_advantages(correct, 8, k=4))
  assert np.all(adv[:8] == 0)
  assert adv[8] > 0 and np.all(adv[9:] < 0)
  with pytest.raises(ValueError, match="k=9"):
    A.passk_advantages(correct, 8, k=9)


# --------------------------------------------------------------------------------------------------
# Top-entropy mask
# --------------------------------------------------------------------------------------------------


def np_top_entropy(h, mask, fraction):
  n = int(mask.sum())
  if n == 0:
    return np.zeros(mask.shape, bool)
  k = np_count(n, fraction, up=True)
  threshold = np.sort(h[mask])[::-1][k - 1]
  return mask & (h >= threshold)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.01, 1.0])
def test_top_entropy_mask_matches_the_definition(fraction):
  for seed in range(5):
    rng = np.random.default_rng(seed)
    mask = rng.random((7, 11)) < 0.7
    h = rng.gamma(1.0, 1.0, (7, 11)).astype(np.float32)
    h[~mask] = 100.0  # padding never counts
    got = np.asarray(A.top_entropy_mask(jnp.asarray(h), jnp.asarray(mask), fraction=fraction))
    np.testing.assert_array_equal(got, np_top_entropy(h, mask, fraction))
    assert got.sum() == np_count(int(mask.sum()), fraction, up=True)  # no ties here


def test_top_entropy_mask_includes_ties_and_handles_no_tokens():
  h = jnp.asarray([[3.0, 1.0, 1.0, 1.0, 0.5]])
  mask = jnp.ones((1, 5), bool)
  # ceil(0.4 * 5) = 2: the threshold is the 2nd largest, 1.0, tied three times.
  got = np.asarray(A.top_entropy_mask(h, mask, fraction=0.4))
  np.testing.assert_array_equal(got, [[True, True, True, True, False]])
  none = A.top_entropy_mask(h, jnp.zeros((1, 5), bool), fraction=0.4)
  assert not np.asarray(none).any()


# --------------------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov
# --------------------------------------------------------------------------------------------------


def test_covariance_matches_numpy():
  logp, _, adv, mask = _random_case(0)
  got = np.asarray(L.token_covariance(jnp.asarray(adv), jnp.asarray(logp), jnp.asarray(mask)))
  np.testing.assert_allclose(got, np_cov(adv, logp, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_clip_cov_select_draws_k_candidates_by_row_and_position(seed):
  logp, old, adv, mask = _random_case(seed, b=16, t=20)
  kw = dict(lb=0.05, ub=3.0, clip_low=0.2, clip_high=0.28)
  args = [jnp.asarray(x) for x in (logp, old, adv, mask)]
  cand = np_clip_cov_candidates(logp, old, adv, mask, **kw)
  np.testing.assert_array_equal(np.asarray(L.clip_cov_candidates(*args, **kw)), cand)
  assert cand.sum() > 10
  rng = jax.random.PRNGKey(seed)
  for ratio in (2e-4, 0.02, 0.05, 1.0):
    k = max(1, np_count(int(mask.sum()), ratio, up=False))
    sel = np.asarray(L.clip_cov_select(*args, rng=rng, ratio=ratio, **kw))
    assert sel.sum() == min(k, cand.sum()) and not (sel & ~cand).any()
    # The draw is the k candidates with the smallest bits keyed by (rng, row, position).
    bits = np.asarray(S.token_bits(rng, jnp.arange(16), 20)).astype(np.int64)
    order = sorted((bits[b, t], b, t) for b, t in zip(*np.nonzero(cand)))
    want = np.zeros_like(cand)
    for _, b, t in order[:k]:
      want[b, t] = True
    np.testing.assert_array_equal(sel, want)
  # Rows given in another order with their ids: each token keeps its fate.
  perm = np.random.default_rng(seed).permutation(16)
  sel = np.asarray(L.clip_cov_select(*args, rng=rng, ratio=0.05, **kw))
  permuted = np.asarray(L.clip_cov_select(*[x[perm] for x in args], rng=rng, ratio=0.05,
                                          rows=jnp.asarray(perm), **kw))
  np.testing.assert_array_equal(permuted, sel[perm])


@pytest.mark.parametrize("seed", range(4))
def test_kl_cov_select_is_the_top_k_covariance(seed):
  logp, _, adv, mask = _random_case(seed, b=16, t=20)
  for ratio in (2e-4, 0.002, 0.05, 0.3):
    got = np.asarray(L.kl_cov_select(jnp.asarray(adv), jnp.asarray(logp), jnp.asarray(mask),
                                     ratio=ratio))
    np.testing.assert_array_equal(got, np_kl_cov_select(adv, logp, mask, ratio))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clip_cov_and_kl_cov_losses_match_numpy(agg):
  logp, old, adv, mask = _random_case(7, b=8, t=10)
  sel = np.random.default_rng(1).random(mask.shape) < 0.3
  args = [jnp.asarray(x) for x in (logp, old, adv, mask)]
  unclipped, clipped = np_ppo_terms(logp, old, adv, 0.2, 0.28)
  clip_cov_tok = np.where(sel & mask, 0.0, np.maximum(unclipped, clipped))
  r = np.exp(logp.astype(np.float64) - old)
  kl_cov_tok = -adv * r + np.where(sel, 0.5 * np.abs(logp.astype(np.float64) - old), 0.0)

  def agg_np(x):
    if agg == "token-mean":
      return np_token_mean(x, mask)
    rows = [np.where(mask[b], x[b], 0).sum() / mask[b].sum() for b in range(8) if mask[b].any()]
    return np.mean(rows)

  loss, m = L.clip_cov_policy_loss(*args, select=jnp.asarray(sel), agg=agg)
  np.testing.assert_allclose(float(loss), agg_np(clip_cov_tok), rtol=1e-5)
  np.testing.assert_allclose(float(m["actor/clip_cov_frac"]), (sel & mask).sum() / mask.sum())
  loss, m = L.kl_cov_policy_loss(*args, select=jnp.asarray(sel), kl_coef=0.5, agg=agg)
  np.testing.assert_allclose(float(loss), agg_np(kl_cov_tok), rtol=1e-5)


def verl_clip_cov(logp, old, adv, mask, *, ratio, lb, ub, clip_low, clip_high, rng):
  """verl's compute_policy_loss_clip_cov, restated in NumPy from its published procedure:
  covariance with -inf on padding and on tokens PPO's clip binds, candidates in (lb, ub), a
  random permutation keeps clip_num = max(int(ratio * n), 1) of them, their terms times 0,
  token-mean over the response mask. Returns (loss, the tokens cut)."""
  unclipped, clipped = np_ppo_terms(logp, old, adv, clip_low, clip_high)
  by_origin = (clipped > unclipped) & mask
  cov = np_cov(adv, logp, mask)
  cov[~mask] = -np.inf
  cov[by_origin] = -np.inf
  clip_num = max(int(ratio * mask.sum()), 1)
  idx = np.argwhere((cov < ub) & (cov > lb) & mask)
  idx = idx[rng.permutation(len(idx))[:min(clip_num, len(idx))]]
  corr = np.ones(mask.shape)
  corr[idx[:, 0], idx[:, 1]] = 0
  return np_token_mean(np.maximum(unclipped, clipped) * corr, mask), corr == 0


def verl_kl_cov(logp, old, adv, mask, *, ratio, kl_coef):
  """verl's compute_policy_loss_kl_cov restated: -A * ratio everywhere, -A * ratio + kl_coef *
  |log pi - log pi_old| on the top max(1, int(n * ratio)) covariances of the valid tokens."""
  r = np.exp(logp.astype(np.float64) - old)
  loss = -adv * r
  valid = np.argwhere(mask)
  cov = np_cov(adv, logp, mask)[mask]
  top = valid[np.argsort(-cov, kind="stable")[:max(1, int(len(cov) * ratio))]]
  loss[top[:, 0], top[:, 1]] += kl_coef * np.abs(logp - old)[top[:, 0], top[:, 1]]
  chosen = np.zeros(mask.shape, bool)
  chosen[top[:, 0], top[:, 1]] = True
  return np_token_mean(loss, mask), chosen


# Hand-made: 3 responses of a group (advantages +1.8, +1.8, -3.6), 5 tokens, the last response 3
# long. Confident tokens of the good responses covary in (1, 5) (candidates), one of them with
# its ratio past 1 + clip_high (excluded: PPO's clip binds), one unlikely token of the bad
# response covaries past ub, another inside the band.
HAND = dict(
    logp=np.array([[-0.05, -0.3, -2.0, -0.02, -1.0],
                   [-0.1, -0.05, -0.7, -3.0, -0.01],
                   [-4.0, -0.2, -2.2, 0.0, 0.0]], np.float32),
    old=np.array([[-0.4, -0.6, -2.0, -0.1, -1.1],
                  [-0.2, -0.05, -0.2, -3.0, -0.01],
                  [-3.5, -0.2, -2.5, 0.0, 0.0]], np.float32),
    adv=np.array([[1.8] * 5, [1.8] * 5, [-3.6] * 5], np.float32),
    mask=np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool))


def test_clip_cov_matches_verl_on_hand_made_cases():
  h = HAND
  args = [jnp.asarray(h[k]) for k in ("logp", "old", "adv", "mask")]
  kw = dict(lb=1.0, ub=5.0, clip_low=0.2, clip_high=0.28)
  cand = np_clip_cov_candidates(h["logp"], h["old"], h["adv"], h["mask"], **kw)
  cov = np_cov(h["adv"], h["logp"], h["mask"])
  assert cand.sum() == 5 and not cand[0, 0] and 1 < cov[0, 0] < 5  # [0, 0]: clipped by PPO
  assert not cand[2, 0] and cov[2, 0] > 5
  # ratio 1: clip_num = 13 >= candidates, so verl's draw keeps every candidate: no randomness.
  want, cut = verl_clip_cov(h["logp"], h["old"], h["adv"], h["mask"], ratio=1.0,
                            rng=np.random.default_rng(0), **kw)
  loss, m = L.clip_cov_policy_loss(*args, rng=jax.random.PRNGKey(0), ratio=1.0, **kw)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(m["actor/clip_cov_frac"]) == pytest.approx(cut.sum() / 13)
  # verl's default ratio 2e-4: one token cut; its loss is verl's with that token's draw.
  sel = np.asarray(L.clip_cov_select(*args, rng=jax.random.PRNGKey(5), ratio=2e-4, **kw))
  assert sel.sum() == 1 and (sel <= cand).all()
  loss, _ = L.clip_cov_policy_loss(*args, rng=jax.random.PRNGKey(5), ratio=2e-4, **kw)
  for seed in range(20):  # among verl's draws, the one that picks our token gives our loss
    want, cut = verl_clip_cov(h["logp"], h["old"], h["adv"], h["mask"], ratio=2e-4,
                              rng=np.random.default_rng(seed), **kw)
    if (cut == sel).all():
      np.testing.assert_allclose(float(loss), want, rtol=1e-5)
      break
  else:
    raise AssertionError("no verl draw picked the token")


@pytest.mark.parametrize("ratio", [2e-4, 0.15, 0.3])
def test_kl_cov_matches_verl_on_hand_made_cases(ratio):
  h = HAND
  want, chosen = verl_kl_cov(h["logp"], h["old"], h["adv"], h["mask"], ratio=ratio, kl_coef=1.0)
  args = [jnp.asarray(h[k]) for k in ("logp", "old", "adv", "mask")]
  loss, m = L.kl_cov_policy_loss(*args, ratio=ratio, kl_coef=1.0)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(L.kl_cov_select(args[2], args[0], args[3], ratio=ratio)), chosen)
  assert float(m["actor/kl_cov_frac"]) == pytest.approx(chosen.sum() / 13)


def test_clip_cov_cut_tokens_get_no_gradient():
  logp, old, adv, mask = _random_case(3, b=8, t=10)
  kw = dict(rng=jax.random.PRNGKey(1), ratio=0.1, lb=0.05, ub=4.0)
  rest = [jnp.asarray(x) for x in (old, adv, mask)]
  sel = np.asarray(L.clip_cov_select(jnp.asarray(logp), *rest, **kw))
  assert sel.sum() >= 3
  grad = np.asarray(jax.grad(lambda lp: L.clip_cov_policy_loss(lp, *rest, **kw)[0])(
      jnp.asarray(logp)))
  assert np.all(grad[sel] == 0.0) and np.all(grad[~mask] == 0.0)
  # Every other token of a response with a signal and not clipped still gets its gradient.
  unclipped, clipped = np_ppo_terms(logp, old, adv, 0.2, 0.28)
  live = mask & ~sel & ~(clipped > unclipped) & (np.abs(adv) > 1e-3)
  assert live.sum() > 10 and np.all(grad[live] != 0.0)
  # ... the PPO surrogate's: -A * ratio / n.
  np.testing.assert_allclose(grad[live], (-adv * np.exp(logp - old) / mask.sum())[live],
                             rtol=1e-5)


def test_kl_cov_gradient_adds_the_penalty_on_selected_tokens_only():
  logp, old, adv, mask = _random_case(4, b=8, t=10)
  rest = [jnp.asarray(x) for x in (old, adv, mask)]
  sel = np.asarray(L.kl_cov_select(rest[1], jnp.asarray(logp), rest[2], ratio=0.1))
  grad = np.asarray(jax.grad(lambda lp: L.kl_cov_policy_loss(lp, *rest, ratio=0.1, kl_coef=2.0)[0])(
      jnp.asarray(logp)))
  n = mask.sum()
  base = -adv * np.exp(logp - old) / n
  np.testing.assert_allclose(grad[mask & ~sel], base[mask & ~sel], rtol=1e-5)
  np.testing.assert_allclose(grad[sel], (base + 2.0 * np.sign(logp - old) / n)[sel], rtol=1e-5)
  assert np.all(grad[~mask] == 0.0)


# --------------------------------------------------------------------------------------------------
# Rollout correction
# --------------------------------------------------------------------------------------------------


def test_tis_weights_match_numpy_in_every_mode():
  rng = np.random.default_rng(0)
  mask = rng.random((6, 9)) < 0.8
  old = np.log(rng.uniform(0.01, 1, (6, 9))).astype(np.float32)
  sampler = (old + rng.normal(0, 0.8, (6, 9))).astype(np.float32)
  sampler[0, 0] = old[0, 0] + 60.0  # a ratio of e^-60: clamped to e^-20 first
  mask[0, 0] = True
  args = [jnp.asarray(x) for x in (old, sampler, mask)]
  rho = np.exp(np.clip(old.astype(np.float64) - sampler, -20, 20))
  got = np.asarray(L.tis_weights(*args, cap=2.0))
  np.testing.assert_allclose(got, np.where(mask, np.minimum(rho, 2.0), 0), rtol=1e-5)
  assert got[0, 0] == pytest.approx(math.exp(-20), rel=1e-4)
  seq = np.exp(np.clip(np.where(mask, old.astype(np.float64) - sampler, 0).sum(1), -20, 20))
  got = np.asarray(L.tis_weights(*args, cap=3.0, mode="sequence"))
  np.testing.assert_allclose(got, np.where(mask, np.minimum(seq, 3.0)[:, None], 0), rtol=1e-4)
  got = np.asarray(L.tis_weights(*args, cap=2.0, mode="token_mask"))
  keep = mask & (rho >= 0.5) & (rho <= 2.0)
  np.testing.assert_array_equal(got, keep.astype(np.float32))
  assert 0 < keep.sum() < mask.sum()
  with pytest.raises(ValueError, match="cap"):
    L.tis_weights(*args, cap=0.5, mode="token_mask")


def test_tis_weights_scale_the_gradient_and_receive_none():
  logp, old, adv, mask = _random_case(5)
  sampler = old + np.random.default_rng(0).normal(0, 0.5, old.shape).astype(np.float32)

  def loss(lp, o, s):
    w = L.tis_weights(o, s, jnp.asarray(mask), cap=2.0)
    return L.policy_loss(lp, o, jnp.asarray(adv), jnp.asarray(mask), weights=w)[0]

  args = [jnp.asarray(x) for x in (logp, old, sampler)]
  g_lp, g_old, g_s = jax.grad(loss, argnums=(0, 1, 2))(*args)
  plain = jax.grad(lambda lp: L.policy_loss(lp, args[1], jnp.asarray(adv),
                                            jnp.asarray(mask))[0])(args[0])
  w = np.asarray(L.tis_weights(args[1], args[2], jnp.asarray(mask), cap=2.0))
  np.testing.assert_allclose(np.asarray(g_lp), w * np.asarray(plain), rtol=1e-5, atol=1e-8)
  # The weights are detached: the old log-probs get only the ratio's gradient, the sampler's none.
  assert not np.asarray(g_s).any()
  g_old_plain = jax.grad(lambda o: L.policy_loss(args[0], o, jnp.asarray(adv),
                                                 jnp.asarray(mask))[0])(args[1])
  np.testing.assert_allclose(np.asarray(g_old), w * np.asarray(g_old_plain), rtol=1e-5,
                             atol=1e-8)


# --------------------------------------------------------------------------------------------------
# Through the actor loss
# --------------------------------------------------------------------------------------------------


def test_actor_loss_top_entropy_gradient_only_through_selected_tokens():
  rng = np.random.default_rng(0)
  b, t, v = 4, 8, 13
  logits = jnp.asarray(rng.normal(0, 2, (b, t, v)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, v, (b, t)))
  mask = jnp.asarray(np.arange(t)[None] < np.array([[8], [5], [8], [3]]))
  logp, ent = L.logprobs_and_entropy(logits, targets)
  batch = dict(targets=targets, mask=mask, old_logprobs=logp + 0.1,
               advantages=jnp.asarray(np.repeat([[1.0], [-0.5], [2.0], [-1.0]], t, 1),
                                      jnp.float32))
  cfg = actor_lib.LossConfig(top_entropy_fraction=0.25, entropy_advantage=True)
  fields, _ = actor_lib.token_selections(logp, ent, batch, cfg, rng=jax.random.PRNGKey(0),
                                         rows=jnp.arange(b))
  top = np.asarray(fields["top_entropy"])
  assert top.sum() == math.ceil(0.25 * 24)
  np.testing.assert_array_equal(top, np_top_entropy(np.asarray(ent), np.asarray(mask), 0.25))
  batch.update(fields)
  grad = jax.grad(lambda z: actor_lib.actor_loss(z, batch, cfg)[0])(logits)
  per_token = np.abs(np.asarray(grad)).sum(-1)
  assert np.all(per_token[~top] == 0.0) and np.all(per_token[top] > 0)
  _, m = actor_lib.actor_loss(logits, batch, cfg)
  assert float(m["actor/top_entropy_frac"]) == pytest.approx(6 / 24)
  with pytest.raises(ValueError, match="top_entropy"):
    actor_lib.actor_loss(logits, {k: v for k, v in batch.items() if k != "top_entropy"}, cfg)


def test_loss_config_rejects_bad_suite_settings():
  with pytest.raises(ValueError, match="policy_loss"):
    actor_lib.LossConfig(policy_loss="clip-cov")
  with pytest.raises(ValueError, match="clip_cov_ratio"):
    actor_lib.LossConfig(policy_loss="clip_cov", clip_cov_ratio=0.0)
  with pytest.raises(ValueError, match="dual clip"):
    actor_lib.LossConfig(policy_loss="kl_cov", clip_c=3.0)
  with pytest.raises(ValueError, match="lb"):
    actor_lib.LossConfig(clip_cov_lb=5.0, clip_cov_ub=1.0)
  # The Clip-Cov recipe's widened clip (ratio floor 0) is allowed.
  assert actor_lib.LossConfig(policy_loss="clip_cov", clip_low=1.0, clip_high=1.0).selects_tokens
