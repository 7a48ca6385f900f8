"""Advantages: GRPO group normalisation, GAE, masked whitening, and the paper's entropy term psi.

Shape letters: B rows (responses), T response tokens, G responses per prompt (group size).
Every function is a pure function of arrays: it jits, has no Python branch on array values, and
treats `mask` [B, T] (1 on response tokens, 0 on padding) as the only source of truth about which
positions exist. Masked positions come out as exactly 0.

The paper's contribution (Cheng et al., arXiv 2506.14758, eq. for psi) is `entropy_advantage`:

    psi_t = min(alpha * stop_gradient(H_t), |A_t| / kappa)        A'_t = A_t + psi_t

It is added to the advantage inside `explore_jax.rl.actor_loss`, where H_t comes from the same
forward pass the loss differentiates.

Two methods of the exploration suite that the paper is compared with live here too:
`passk_advantages` (Chen et al. 2025, the analytic pass@k advantage that replaces GRPO's) and
`top_entropy_mask` (Wang et al. 2025, the policy gradient through the highest-entropy tokens only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from explore_jax.rl import selection

Array = jax.Array


def grpo_advantages(rewards: Array, group_size: int, *, eps: float = 1e-6,
                    norm_by_std: bool = True) -> Array:
  """GRPO advantages [B] from rewards [B]; rows [g*G, (g+1)*G) answer the same prompt.

  A_i = (r_i - mean_g) / (std_g + eps) with the unbiased (n - 1) std, or r_i - mean_g when
  `norm_by_std` is False. A group whose rewards are all equal gives exactly 0: its mean need not be
  representable exactly (0.1 * 3 / 3 != 0.1 in floating point), so it is zeroed explicitly.
  Broadcast to tokens with `per_token`.
  """
  if group_size < 1 or rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(
        f"grpo_advantages: rewards of shape {rewards.shape} cannot be split into groups of "
        f"group_size={group_size} consecutive rows")
  r = rewards.astype(jnp.float32).reshape(-1, group_size)  # [B/G, G]
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  if norm_by_std:
    # max(G - 1, 1): a group of one has no spread; it is all-equal and zeroed below anyway.
    var = jnp.sum(centred * centred, axis=1, keepdims=True) / max(group_size - 1, 1)
    centred = centred / (jnp.sqrt(var) + eps)
  all_equal = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
  return jnp.where(all_equal, 0.0, centred).reshape(-1)


def per_token(seq_values: Array, mask: Array) -> Array:
  """Broadcast one value per row [B] to its response tokens [B, T]; 0 on masked positions."""
  return jnp.where(mask, seq_values[:, None].astype(jnp.float32), 0.0)


def reward_at_last_token(scores: Array, mask: Array) -> Array:
  """Token rewards [B, T] for GAE: the sequence score [B] on each row's last unmasked token."""
  t = mask.shape[1]
  last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # [B]; a row with no token has none to hold it
  at_last = (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(mask, axis=1, keepdims=True)
  return jnp.where(at_last, scores[:, None].astype(jnp.float32), 0.0)


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[Array, Array]:
  """Generalised advantage estimation over tokens: (advantages [B, T], returns [B, T]).

  Masked positions are skipped, not treated as zero-reward steps: the successor of an unmasked
  token t is the next unmasked token t' > t, so
      delta_t = r_t + gamma * V_t' - V_t,     A_t = delta_t + gamma * lam * A_t'
  with V = A = 0 after the last unmasked token. Response masks are contiguous, where this is the
  usual recursion; skipping makes it correct for any mask. returns = advantages + values on
  unmasked tokens and 0 elsewhere (the values of padding are never read).
  """
  mask = mask.astype(bool)
  rewards = rewards.astype(jnp.float32)
  values = values.astype(jnp.float32)

  def step(carry, x):  # one time step for every row, walking backwards
    next_value, next_adv = carry  # [B], [B]: of the next unmasked token
    r, v, m = x
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return carry, jnp.where(m, adv, 0.0)

  zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
  xs = (rewards.T, values.T, mask.T)  # [T, B] each: scan runs over time
  _, adv_tb = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
  advantages = adv_tb.T
  returns = jnp.where(mask, advantages + values, 0.0)
  return advantages, returns


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """(x - mean) / std with mean and (population) std over the unmasked entries; 0 where masked.

  `shift_mean=False` only divides by the std, which keeps the sign of every entry.
  """
  m = mask.astype(jnp.float32)
  x = x.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x * m) / n
  var = jnp.sum(jnp.square(x - mean) * m) / n
  out = (x - mean if shift_mean else x) * jax.lax.rsqrt(var + eps)
  return jnp.where(mask, out, 0.0)


def entropy_advantage(advantages: Array, entropy: Array, *, alpha: float, kappa: float) -> Array:
  """The paper's entropy term psi = min(alpha * stop_gradient(H), |A| / kappa), elementwise.

  Add it to the advantage (A' = A + psi) in place of A in the policy loss. Properties that hold
  for alpha >= 0, and which the tests check:
    * psi >= 0, so it only ever raises the advantage of a token, more where the policy is unsure;
    * psi <= |A| / kappa, so for kappa > 1 it never flips the sign of A, and psi = 0 where A = 0
      (no exploration bonus for a response the reward gives no signal about);
    * no gradient flows through H: it is a per-token reweighting, not an entropy regulariser.
  H is clamped at 0 because a float32 entropy of a near-deterministic token may be -1e-7.
  """
  return jnp.minimum(entropy_offset(entropy, alpha=alpha),
                     jnp.abs(advantages.astype(jnp.float32)) / kappa)


def entropy_offset(entropy: Array, *, alpha: float) -> Array:
  """The placebo of `entropy_advantage`: alpha * stop_gradient(H) with no clip, on every token.

  H_t depends only on the prefix, so at ratio 1 the offset's expected policy gradient is exactly
  0, as a baseline's is; what it does change comes from finite samples, the PPO ratio clip and
  the token-mean normaliser. An arm with it separates those from the effect of psi's clip.
  """
  return alpha * jax.lax.stop_gradient(jnp.maximum(entropy.astype(jnp.float32), 0.0))


def clip_binds(advantages: Array, entropy: Array, *, alpha: float, kappa: float) -> Array:
  """Where psi's clip binds: alpha * H > |A| / kappa (bool, elementwise)."""
  return entropy_offset(entropy, alpha=alpha) > jnp.abs(advantages.astype(jnp.float32)) / kappa


def _binomial_ratio(a: Array, b: int, k: int) -> Array:
  """C(a, k) / C(b, k) for integer arrays a <= b and static b >= k >= 0: prod_i (a - i) / (b - i),
  which is 0 when a < k (a factor a - i is 0 then; max(., 0) covers a < 0, where C(a, k) = 0 for
  k >= 1)."""
  out = jnp.ones(a.shape, jnp.float32)
  for i in range(k):
    out = out * jnp.maximum(a - i, 0).astype(jnp.float32) / (b - i)
  return out


def passk_advantages(correct: Array, group_size: int, *, k: int) -> Array:
  """The analytic pass@k advantage (Chen et al. 2025, arXiv 2508.10751) [R] from correct [R] (0/1).

  Rows [g*G, (g+1)*G) answer the same prompt. Per group with N_neg incorrect responses, the group's
  pass@k reward is R = 1 - C(N_neg, k) / C(G, k) and sigma = sqrt(R (1 - R)); a correct response
  gets (1 - R) / sigma, an incorrect one (1 - R - C(N_neg - 1, k - 1) / C(G - 1, k - 1)) / sigma,
  and every row of a group with sigma = 0 gets 0: all incorrect (R = 0), or fewer than k
  incorrect, so that every k-subset holds a correct response (R = 1). At k = 1 this is GRPO with
  the population std and no epsilon.
  """
  if not 1 <= k <= group_size:
    raise ValueError(f"passk_advantages: k={k} must be in [1, group_size={group_size}]")
  if correct.ndim != 1 or correct.shape[0] % group_size:
    raise ValueError(f"passk_advantages: correct of shape {correct.shape} cannot be split into "
                     f"groups of group_size={group_size} consecutive rows")
  c = (correct.reshape(-1, group_size) > 0)  # [R/G, G]
  n_neg = jnp.sum(~c, axis=1, keepdims=True).astype(jnp.int32)  # [R/G, 1]
  reward = 1.0 - _binomial_ratio(n_neg, group_size, k)
  sigma = jnp.sqrt(jnp.maximum(reward * (1.0 - reward), 0.0))
  # An incorrect response is in C(G - 1, k - 1) of the k-subsets, C(N_neg - 1, k - 1) of them
  # all-incorrect: its share of the group's failures.
  miss = _binomial_ratio(n_neg - 1, group_size - 1, k - 1)
  adv = jnp.where(c, 1.0 - reward, 1.0 - reward - miss) / jnp.where(sigma > 0, sigma, 1.0)
  return jnp.where(sigma > 0, adv, 0.0).reshape(-1)


def top_entropy_mask(entropy: Array, mask: Array, *, fraction: float) -> Array:
  """bool [B, T]: the ceil(fraction * n) highest-entropy of the n tokens of `mask`, and every
  token tied with the last of them ("Beyond the 80/20 Rule", Wang et al. 2025: the policy
  gradient flows through these only; their fraction is 0.2).

  The threshold is the ceil(fraction * n)-th largest entropy over every token given, so a caller
  that wants it over a whole mini-batch passes the whole mini-batch (the trainer does, see
  `explore_jax.train.step`)."""
  selection.check_fraction(fraction, "top_entropy_mask: fraction")
  mask = mask.astype(bool)
  n = jnp.sum(mask.astype(jnp.int32))
  k = selection.fraction_count(n, fraction, round_up=True)
  h = jnp.where(mask, entropy.astype(jnp.float32), -jnp.inf).reshape(-1)
  ranked = -jnp.sort(-h)  # descending
  threshold = ranked[jnp.maximum(k - 1, 0)]
  return mask & (entropy.astype(jnp.float32) >= threshold) & (n > 0)
