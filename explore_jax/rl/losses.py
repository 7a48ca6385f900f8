"""Per-token quantities and losses: entropy, log-probs, PPO surrogate, value loss, KL estimators,
and the exploration suite's losses (Clip-Cov, KL-Cov) and rollout-correction weights.

Shape letters: B rows, T response tokens, V vocab, D width, c tokens per chunk.
`mask` [B, T] marks the response tokens; whatever sits at masked positions (padding logits,
garbage log-probs) never reaches a loss, a metric or a gradient.

Aggregation and gradient accumulation. Every loss reduces its per-token values with `aggregate`:
  token-mean           sum over all tokens / number of tokens                (default)
  seq-mean-token-mean  mean over rows of (row sum / row length)
  seq-mean-token-sum   mean over rows of row sums
The denominators (number of tokens, number of rows with at least one token) default to those of the
arrays given, and can be overridden with `num_tokens` / `num_seqs`: pass the counts of the whole
mini-batch and the losses of its micro-batches *sum* to the loss of the mini-batch, gradients too.
Metrics are always plain means over the arrays given (independent of `num_tokens`), so a trainer
averages them over micro-batches, weighting by the returned token count if it wants exactness.

Numerics: logits may be bfloat16; log-softmax and entropy are computed in float32 after
subtracting the row max. The chunked forms map over T with `jax.checkpoint` around each chunk, so
neither the forward nor the backward pass holds more than one chunk's [B, c, V] probabilities
(vocab 152k at 8K tokens would be 4.6 GiB per row in float32 otherwise).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from explore_jax.rl import selection

Array = jax.Array
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3")

# --------------------------------------------------------------------------------------------------
# Entropy and log-probs of the policy, temperature 1
# --------------------------------------------------------------------------------------------------


def _log_normaliser_and_entropy(logits: Array) -> tuple[Array, Array]:
  """logsumexp(z) and H = logsumexp(z) - sum(softmax(z) * z) over the last axis, in float32."""
  z = logits.astype(jnp.float32)
  z_max = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  z_max = jnp.where(jnp.isfinite(z_max), z_max, 0.0)
  shifted = z - z_max
  exp = jnp.exp(shifted)
  sum_exp = jnp.sum(exp, axis=-1)
  probs = exp / sum_exp[..., None]
  # -inf logits (banned tokens) have p = 0; 0 * -inf would be nan, so they contribute 0 instead.
  finite = jnp.where(jnp.isfinite(shifted), shifted, 0.0)
  log_sum_exp = jnp.log(sum_exp)
  entropy = log_sum_exp - jnp.sum(probs * finite, axis=-1)
  return log_sum_exp + z_max[..., 0], entropy


def entropy_from_logits(logits: Array) -> Array:
  """Entropy [...] of softmax(logits [..., V]) in float32, for any float dtype of logits."""
  return _log_normaliser_and_entropy(logits)[1]


def logprobs_and_entropy(logits: Array, targets: Array) -> tuple[Array, Array]:
  """log pi(targets) and H from the same logits [B, T, V]; targets [B, T] -> two [B, T] float32.

  logits[:, t] is the distribution the target token targets[:, t] was sampled from (the caller
  shifts by one).
  """
  lse, entropy = _log_normaliser_and_entropy(logits)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked.astype(jnp.float32) - lse, entropy


def _map_over_time(fn: Callable, xs: tuple[Array, ...], chunk: int) -> tuple[Array, ...]:
  """Apply fn to chunks [B, c, ...] of the arrays xs [B, T, ...] in sequence; concatenate on T.

  Chunks are sliced inside the loop (no padded or transposed copy of xs, which may be the full
  logits); when c does not divide T the last chunk is the final c tokens, overlapping the one
  before, and only its new tokens are kept. jax.checkpoint makes the backward pass recompute each
  chunk's [B, c, V] intermediates instead of storing them.
  """
  if chunk < 1:
    raise ValueError(f"chunk={chunk}: must be a positive number of tokens")
  b, t = xs[0].shape[:2]
  c = min(chunk, t)
  n = -(-t // c)
  starts = jnp.minimum(jnp.arange(n) * c, t - c)

  def one(start):
    return fn(tuple(jax.lax.dynamic_slice_in_dim(x, start, c, axis=1) for x in xs))

  outs = jax.lax.map(jax.checkpoint(one), starts)  # each [n, B, c, ...]
  fresh = t - (n - 1) * c  # tokens of the last chunk not already in the one before

  def join(y):  # [n, B, c, ...] -> [B, T, ...]
    head = jnp.swapaxes(y[:-1], 0, 1).reshape(b, (n - 1) * c, *y.shape[3:])
    return jnp.concatenate([head, y[-1][:, c - fresh:]], axis=1)

  return tuple(join(y) for y in outs)


def entropy_from_logits_chunked(logits: Array, *, chunk: int = 512) -> Array:
  """`entropy_from_logits` for logits [B, T, V], c = `chunk` tokens at a time: [B, T] float32."""
  return _map_over_time(lambda xs: (entropy_from_logits(xs[0]),), (logits,), chunk)[0]


def token_logprobs_and_entropy(hidden: Array, w_out: Array, targets: Array, *,
                               chunk: int | None = 512) -> tuple[Array, Array]:
  """log pi(targets) and H [B, T] from hidden states [B, T, D] and the output embedding [D, V].

  The logits are formed chunk by chunk (float32 accumulation of the matmul), so the full [B, T, V]
  logits never exist, in the forward or the backward pass. chunk=None computes them at once.
  """
  def one_chunk(xs):
    h, tgt = xs  # [B, c, D], [B, c]
    # One 2-D matmul over all B * c rows (faster on CPU than a batched contraction, see
    # explore_jax.models.qwen2._project), accumulated in float32.
    logits = jnp.matmul(h.reshape(-1, h.shape[-1]), w_out.astype(h.dtype),
                        preferred_element_type=jnp.float32).reshape(*h.shape[:-1], -1)
    return logprobs_and_entropy(logits, tgt)

  if chunk is None:
    return one_chunk((hidden, targets))
  return _map_over_time(one_chunk, (hidden, targets), chunk)


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def aggregate(per_token: Array, mask: Array, agg: str, *, num_tokens: Array | int | None = None,
              num_seqs: Array | int | None = None) -> Array:
  """Reduce per-token values [B, T] to a scalar by `agg` (see the module docstring)."""
  if agg not in AGG_MODES:
    raise ValueError(f"agg={agg!r}: use one of {AGG_MODES}")
  m = mask.astype(jnp.float32)
  x = jnp.where(mask.astype(bool), per_token.astype(jnp.float32), 0.0)
  if agg == "token-mean":
    n = jnp.sum(m) if num_tokens is None else num_tokens
    return jnp.sum(x) / jnp.maximum(n, 1)
  lengths = jnp.sum(m, axis=-1)  # [B]
  rows = jnp.sum(x, axis=-1)
  if agg == "seq-mean-token-mean":
    rows = rows / jnp.maximum(lengths, 1.0)
  s = jnp.sum(lengths > 0) if num_seqs is None else num_seqs
  return jnp.sum(rows) / jnp.maximum(s, 1)


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean of x over the unmasked entries; 0 when there are none (metrics stay finite)."""
  return aggregate(x, mask, "token-mean")


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def _ratio_terms(logprobs, old_logprobs, advantages, mask):
  """(mask, log-ratio, ratio, A) with 0 at masked positions; the log-ratio is clamped to
  [-20, 20] before exp so that a stale token cannot overflow (its gradient is clipped away)."""
  mask = mask.astype(bool)
  log_ratio = jnp.where(mask, logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32), 0.)
  ratio = jnp.exp(jnp.clip(log_ratio, -20.0, 20.0))
  adv = jnp.where(mask, advantages.astype(jnp.float32), 0.0)
  return mask, log_ratio, ratio, adv


def _ppo_terms(ratio, adv, clip_low, clip_high):
  """(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)) per token."""
  return -adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)


def _weighted(per_token: Array, weights: Array | None) -> Array:
  """Each token's loss term times its detached weight (rollout correction, top-entropy mask)."""
  if weights is None:
    return per_token
  return per_token * jax.lax.stop_gradient(weights.astype(jnp.float32))


def _surrogate_metrics(per_token, ratio, log_ratio, mask, agg) -> dict:
  # k3 estimate of KL(pi_old || pi) from tokens sampled by pi_old: (r - 1) - log r >= 0.
  return {"actor/approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
          "actor/pg_loss": aggregate(per_token, mask, agg)}


def policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, *,
                clip_low: float = 0.2, clip_high: float = 0.28, clip_c: float | None = None,
                agg: str = "token-mean", num_tokens=None, num_seqs=None,
                weights: Array | None = None) -> tuple[Array, dict]:
  """PPO clipped surrogate with clip-higher and optional dual clip: (loss, metrics).

  Per token, with ratio = exp(logp - logp_old):
      l = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
  and with dual clip (clip_c > 1), for A < 0 only, l = min(l, -A * clip_c): a token whose ratio
  has exploded under a negative advantage stops pushing. `weights` [B, T] (detached) multiply
  each token's l (rollout correction, the top-entropy mask); the denominators are unchanged.
  """
  if clip_c is not None and not clip_c > 1.0:
    raise ValueError(f"clip_c={clip_c}: the dual-clip constant must be > 1 (or None for off)")
  mask, log_ratio, ratio, adv = _ratio_terms(logprobs, old_logprobs, advantages, mask)
  unclipped, clipped = _ppo_terms(ratio, adv, clip_low, clip_high)
  per_token = jnp.maximum(unclipped, clipped)
  metrics = {"actor/clip_frac": masked_mean(clipped > unclipped, mask)}
  if clip_c is not None:
    floor = -adv * clip_c
    lower = (adv < 0) & (per_token > floor)
    per_token = jnp.where(lower, floor, per_token)
    metrics["actor/clip_frac_lower"] = masked_mean(lower, mask)
  per_token = _weighted(per_token, weights)
  metrics.update(_surrogate_metrics(per_token, ratio, log_ratio, mask, agg))
  loss = aggregate(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
  return loss, metrics


# --------------------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
# Reasoning Language Models"; verl's compute_policy_loss_clip_cov / _kl_cov)
# --------------------------------------------------------------------------------------------------
#
# Both act on the tokens whose advantage and log-probability covary most, the ones whose updates
# the paper finds drive the entropy down:
#     cov_t = (A_t - mean A) (log pi_t - mean log pi),  means over the loss's tokens.
# verl takes these means, the top-k and the random draw over each micro-batch of each GPU; here
# the selection functions take whatever tokens they are given, and the trainer gives them a whole
# mini-batch (explore_jax.train.step), then hands the selection to the loss of each micro-batch
# through `select`. With `select=None` a loss selects over its own arrays.


def token_covariance(advantages: Array, logprobs: Array, mask: Array) -> Array:
  """cov_t = (A_t - mean A)(log pi_t - mean log pi) [B, T], means over `mask`; 0 elsewhere; no
  gradient (it only selects tokens)."""
  mask = mask.astype(bool)
  a = jnp.where(mask, advantages.astype(jnp.float32), 0.0)
  lp = jnp.where(mask, jax.lax.stop_gradient(logprobs).astype(jnp.float32), 0.0)
  n = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
  return jnp.where(mask, (a - jnp.sum(a) / n) * (lp - jnp.sum(lp) / n), 0.0)


def clip_cov_candidates(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, *,
                        lb: float = 1.0, ub: float = 5.0, clip_low: float = 0.2,
                        clip_high: float = 0.28) -> Array:
  """bool [B, T]: Clip-Cov's candidates, the tokens not clipped by PPO's ratio clip (the clipped
  term is not the larger one) whose covariance lies in (lb, ub)."""
  mask, _, ratio, adv = _ratio_terms(logprobs, old_logprobs, advantages, mask)
  unclipped, clipped = _ppo_terms(ratio, adv, clip_low, clip_high)
  cov = token_covariance(advantages, logprobs, mask)
  return mask & ~(clipped > unclipped) & (cov > lb) & (cov < ub)


def clip_cov_select(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, *,
                    rng: Array, ratio: float = 2e-4, lb: float = 1.0, ub: float = 5.0,
                    clip_low: float = 0.2, clip_high: float = 0.28,
                    rows: Array | None = None) -> Array:
  """bool [B, T]: max(1, int(ratio * n)) of the candidates (all when fewer) drawn at random, n
  the number of tokens in `mask`. The draw gives each token random bits keyed by (rng, its row's
  id in `rows` (default 0..B-1), its position) and takes the candidates with the smallest, so a
  token's fate does not depend on which other rows share its array."""
  selection.check_fraction(ratio, "clip_cov ratio")
  cand = clip_cov_candidates(logprobs, old_logprobs, advantages, mask, lb=lb, ub=ub,
                             clip_low=clip_low, clip_high=clip_high)
  rows = jnp.arange(mask.shape[0]) if rows is None else rows
  k = jnp.maximum(selection.fraction_count(jnp.sum(mask.astype(jnp.int32)), ratio,
                                           round_up=False), 1)
  bits = selection.token_bits(rng, rows, mask.shape[1])
  return cand & selection.first_k((~cand, bits), k, rows)


def clip_cov_policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, *,
                         rng: Array | None = None, ratio: float = 2e-4, lb: float = 1.0,
                         ub: float = 5.0, clip_low: float = 0.2, clip_high: float = 0.28,
                         agg: str = "token-mean", num_tokens=None, num_seqs=None,
                         select: Array | None = None,
                         weights: Array | None = None) -> tuple[Array, dict]:
  """Clip-Cov: PPO's clipped surrogate with the loss term of the selected tokens set to 0.

  The selection (`clip_cov_select`, or `select` [B, T] when given) loses its gradient; those
  tokens still count in the token-mean's denominator. verl's defaults are ratio 2e-4, lb 1, ub 5;
  the paper's 7B recipe widens PPO's ratio clip to clip_low = clip_high = 1. `weights` as in
  `policy_loss`."""
  if select is None:
    if rng is None:
      raise ValueError("clip_cov_policy_loss: give rng (the random draw's key) or select")
    select = clip_cov_select(logprobs, old_logprobs, advantages, mask, rng=rng, ratio=ratio,
                             lb=lb, ub=ub, clip_low=clip_low, clip_high=clip_high)
  mask, log_ratio, ratio_t, adv = _ratio_terms(logprobs, old_logprobs, advantages, mask)
  unclipped, clipped = _ppo_terms(ratio_t, adv, clip_low, clip_high)
  select = select.astype(bool) & mask
  per_token = _weighted(jnp.where(select, 0.0, jnp.maximum(unclipped, clipped)), weights)
  metrics = {"actor/clip_frac": masked_mean(clipped > unclipped, mask),
             "actor/clip_cov_frac": masked_mean(select, mask),
             **_surrogate_metrics(per_token, ratio_t, log_ratio, mask, agg)}
  loss = aggregate(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
  return loss, metrics


def kl_cov_select(advantages: Array, logprobs: Array, mask: Array, *, ratio: float = 2e-4,
                  rows: Array | None = None) -> Array:
  """bool [B, T]: the max(1, int(ratio * n)) tokens of `mask` with the largest covariance; ties
  broken by row id (`rows`, default 0..B-1), then position. None when `mask` has no token."""
  selection.check_fraction(ratio, "kl_cov ratio")
  mask = mask.astype(bool)
  n = jnp.sum(mask.astype(jnp.int32))
  k = jnp.maximum(selection.fraction_count(n, ratio, round_up=False), 1)
  cov = token_covariance(advantages, logprobs, mask)
  return mask & selection.first_k((~mask, -cov), k, rows)


def kl_cov_policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, *,
                       ratio: float = 2e-4, kl_coef: float = 1.0, agg: str = "token-mean",
                       num_tokens=None, num_seqs=None, select: Array | None = None,
                       weights: Array | None = None) -> tuple[Array, dict]:
  """KL-Cov: the unclipped surrogate -A * ratio on every token, plus kl_coef * |log pi - log
  pi_old| on the selected ones (`kl_cov_select`, or `select` [B, T] when given). verl's defaults
  are ratio 2e-4, kl_coef 1; the paper's 7B recipe uses ratio 0.002. `weights` as in
  `policy_loss` (on the whole term, as verl applies its rollout weights)."""
  if select is None:
    select = kl_cov_select(advantages, logprobs, mask, ratio=ratio)
  mask, log_ratio, ratio_t, adv = _ratio_terms(logprobs, old_logprobs, advantages, mask)
  select = select.astype(bool) & mask
  abs_kl = jnp.abs(log_ratio)
  per_token = _weighted(-adv * ratio_t + jnp.where(select, kl_coef * abs_kl, 0.0), weights)
  metrics = {"actor/kl_cov_frac": masked_mean(select, mask),
             "actor/kl_cov_abs_kl": masked_mean(abs_kl, mask),
             **_surrogate_metrics(per_token, ratio_t, log_ratio, mask, agg)}
  loss = aggregate(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
  return loss, metrics


# --------------------------------------------------------------------------------------------------
# Rollout correction (truncated importance sampling, Yao et al. 2025; verl's rollout correction)
# --------------------------------------------------------------------------------------------------

TIS_MODES = ("token", "sequence", "token_mask")


def tis_weights(old_logprobs: Array, sampler_logprobs: Array, mask: Array, *, cap: float,
                mode: str = "token") -> Array:
  """Detached importance weights [B, T] of the trainer's policy against the sampler's; 0 where
  masked. The sampler (another kernel, another precision, a stale copy) is not exactly the policy
  the PPO ratio starts from; with rho_t = pi_old(a_t) / pi_sampler(a_t):

    token       min(rho_t, cap)                     verl: rollout_is="token", threshold cap
                                                    (decoupled mode; Yao et al.'s TIS)
    sequence    min(prod_t rho_t, cap) on each      verl: rollout_is="sequence"
                token of the row
    token_mask  1 where 1/cap <= rho_t <= cap,      verl: rollout_rs="token", threshold cap
                else 0 (the token is dropped)       (lower 1/cap), no IS weights

  log rho is clamped to [-20, 20] first (verl's safety bound). In token_mask mode a dropped token
  leaves the loss entirely, its denominator included, as verl's rejection mask does: the trainer
  removes it from the batch's mask (explore_jax.train.step.score_rollout)."""
  if mode not in TIS_MODES:
    raise ValueError(f"tis mode={mode!r}: use one of {TIS_MODES}")
  if not cap > 0 or (mode == "token_mask" and cap < 1):
    raise ValueError(f"tis cap={cap}: need cap > 0 (and cap >= 1 with mode 'token_mask')")
  mask = mask.astype(bool)
  log_rho = jnp.where(mask, old_logprobs.astype(jnp.float32)
                      - sampler_logprobs.astype(jnp.float32), 0.0)
  if mode == "sequence":
    log_rho = jnp.broadcast_to(jnp.sum(log_rho, axis=1, keepdims=True), log_rho.shape)
  rho = jnp.exp(jnp.clip(log_rho, -20.0, 20.0))
  if mode == "token_mask":
    w = ((rho >= 1.0 / cap) & (rho <= cap)).astype(jnp.float32)
  else:
    w = jnp.minimum(rho, cap)
  return jax.lax.stop_gradient(jnp.where(mask, w, 0.0))


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array, *, clip: float = 0.5,
               agg: str = "token-mean", num_tokens=None, num_seqs=None) -> tuple[Array, dict]:
  """Clipped value loss 0.5 * max((v - R)^2, (v_old + clip(v - v_old, +-clip) - R)^2)."""
  mask = mask.astype(bool)
  v = jnp.where(mask, values.astype(jnp.float32), 0.0)
  v_old = jnp.where(mask, old_values.astype(jnp.float32), 0.0)
  ret = jnp.where(mask, returns.astype(jnp.float32), 0.0)
  v_clipped = v_old + jnp.clip(v - v_old, -clip, clip)
  unclipped = jnp.square(v - ret)
  clipped = jnp.square(v_clipped - ret)
  per_token = 0.5 * jnp.maximum(unclipped, clipped)
  metrics = {
      "critic/vf_loss": aggregate(per_token, mask, agg),
      "critic/vf_clip_frac": masked_mean(clipped > unclipped, mask),
      "critic/values_mean": masked_mean(v, mask),
      "critic/returns_mean": masked_mean(ret, mask),
  }
  return aggregate(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs), metrics


def kl_penalty(logprobs: Array, ref_logprobs: Array, kind: str = "k3") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman's k1, k2, k3).

  With d = log pi_ref - log pi:  k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - 1 - d.
  k3 is unbiased and >= 0 but grows like exp(d) where the reference finds a token far likelier than
  the policy does; d is clamped to [-20, 20] (no overflow) and k3 to [-10, 10] (no single token
  dominates the loss; its gradient is then 0).
  """
  if kind not in KL_KINDS:
    raise ValueError(f"kl kind={kind!r}: use one of {KL_KINDS}")
  d = ref_logprobs.astype(jnp.float32) - logprobs.astype(jnp.float32)
  if kind == "k1":
    return -d
  if kind == "k2":
    return 0.5 * jnp.square(d)
  d = jnp.clip(d, -20.0, 20.0)
  return jnp.clip(jnp.exp(d) - 1.0 - d, -10.0, 10.0)
