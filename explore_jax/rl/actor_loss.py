"""The whole actor loss in one place: PPO/GRPO surrogate + entropy advantage + regulariser + KL.

    H_t   = entropy of pi(. | s_t) at temperature 1, from the SAME forward pass as log pi(a_t | s_t)
    A'_t  = A_t + psi_t,  psi_t = min(alpha * stop_gradient(H_t), |A_t| / kappa)   (if enabled)
    loss  = policy_loss(log pi, log pi_old, A')  -  entropy_coef * agg(H)  +  kl_coef * agg(KL)

The extras are switched by `LossConfig` and nowhere else:
  * `entropy_advantage` is the paper's method (Cheng et al., arXiv 2506.14758): it only reweights
    tokens, so the gradient equals that of the plain loss with A' precomputed as a constant;
  * `entropy_coef` (beta) is the entropy regulariser of the paper's Table 3 baseline: gradient does
    flow through H;
  * `kl_coef` adds a KL penalty to a reference policy (`ref_logprobs` must be in the batch);
  * the exploration suite, the methods the paper is compared with: `policy_loss` "clip_cov" or
    "kl_cov" replaces the PPO surrogate (Cui et al. 2025), `top_entropy_fraction` > 0 lets the
    policy gradient through the highest-entropy tokens only (Wang et al. 2025). Their token
    selections are statistics of the whole mini-batch, made by `token_selections` before the
    micro-batches' gradients and handed in as batch fields (`cov_select`, `top_entropy`), so
    that they do not depend on how the mini-batch is split (explore_jax.train.step says how).

The batch is a mapping of [B, T] arrays: `targets` (int: the token whose log-prob logits[:, t]
scores), `mask` (response tokens), `old_logprobs`, `advantages` (unshaped A), and `ref_logprobs`
when kl_coef > 0; optionally `tis_weights` (rollout correction: each token's policy-loss term
is multiplied by it). `num_tokens` / `num_seqs` are the mini-batch's counts for gradient accumulation
(see `explore_jax.rl.losses`). Metrics are means over the arrays given; `actor/num_tokens` is
returned so that a trainer can weight them across micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from explore_jax.rl import advantages as adv_lib
from explore_jax.rl import losses
from explore_jax.rl import selection

Array = jax.Array
POLICY_LOSSES = ("ppo", "clip_cov", "kl_cov")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Everything that changes the actor loss; hashable, so it can be a static jit argument."""

  clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] ("clip-higher")
  clip_high: float = 0.28
  clip_c: float | None = None  # dual clip for A < 0 (e.g. 3.0); None = off
  agg: str = "token-mean"  # or "seq-mean-token-mean", "seq-mean-token-sum"
  entropy_advantage: bool = False  # the paper's A + psi
  alpha: float = 0.4  # paper: 0.4 for GRPO, 0.1 for PPO
  kappa: float = 2.0  # > 1 keeps the sign of every advantage
  entropy_clip: bool = True  # False: the placebo psi = alpha * sg(H), unclipped
  entropy_coef: float = 0.0  # beta of the regulariser -beta * H; 0 = off
  kl_coef: float = 0.0  # 0 = no KL to the reference policy
  kl_kind: str = "k3"
  policy_loss: str = "ppo"  # or "clip_cov", "kl_cov" (Cui et al. 2025)
  clip_cov_ratio: float = 2e-4  # share of tokens whose gradient Clip-Cov cuts
  clip_cov_lb: float = 1.0  # Clip-Cov's candidates: lb < cov < ub
  clip_cov_ub: float = 5.0
  kl_cov_ratio: float = 2e-4  # share of tokens KL-Cov penalises
  kl_cov_coef: float = 1.0
  top_entropy_fraction: float = 0.0  # > 0: gradient only through this share of tokens (0.2)

  @property
  def selects_tokens(self) -> bool:
    """Whether the loss needs `token_selections` of the mini-batch."""
    return self.policy_loss != "ppo" or self.top_entropy_fraction > 0

  def __post_init__(self):
    if self.agg not in losses.AGG_MODES:
      raise ValueError(f"LossConfig.agg={self.agg!r}: use one of {losses.AGG_MODES}")
    if self.kl_kind not in losses.KL_KINDS:
      raise ValueError(f"LossConfig.kl_kind={self.kl_kind!r}: use one of {losses.KL_KINDS}")
    # clip_low = 1 (ratio floor 0) is the Clip-Cov recipe's "widened" clip.
    if not (0 <= self.clip_low <= 1 and self.clip_high >= 0):
      raise ValueError(f"LossConfig.clip_low={self.clip_low}, clip_high={self.clip_high}: need "
                       "0 <= clip_low <= 1 and clip_high >= 0")
    if self.clip_c is not None and not self.clip_c > 1:
      raise ValueError(f"LossConfig.clip_c={self.clip_c}: must be > 1, or None for no dual clip")
    if self.alpha < 0 or self.kappa <= 0:
      raise ValueError(f"LossConfig.alpha={self.alpha}, kappa={self.kappa}: need alpha >= 0 and "
                       "kappa > 0 (kappa > 1 for psi never to flip the sign of an advantage)")
    self._check_suite()

  def _check_suite(self):
    if self.policy_loss not in POLICY_LOSSES:
      raise ValueError(f"LossConfig.policy_loss={self.policy_loss!r}: use one of {POLICY_LOSSES}")
    if self.policy_loss != "ppo" and self.clip_c is not None:
      raise ValueError(f"LossConfig.clip_c={self.clip_c}: the dual clip belongs to the PPO "
                       f"surrogate, not to policy_loss={self.policy_loss!r}")
    selection.check_fraction(self.clip_cov_ratio, "LossConfig.clip_cov_ratio")
    selection.check_fraction(self.kl_cov_ratio, "LossConfig.kl_cov_ratio")
    if not self.clip_cov_lb < self.clip_cov_ub or self.kl_cov_coef < 0:
      raise ValueError(f"LossConfig.clip_cov_lb={self.clip_cov_lb}, clip_cov_ub="
                       f"{self.clip_cov_ub}, kl_cov_coef={self.kl_cov_coef}: need lb < ub and "
                       "kl_cov_coef >= 0")
    if self.top_entropy_fraction:
      selection.check_fraction(self.top_entropy_fraction, "LossConfig.top_entropy_fraction")


def _selection_fields(cfg: LossConfig) -> list[str]:
  return ((["cov_select"] if cfg.policy_loss != "ppo" else [])
          + (["top_entropy"] if cfg.top_entropy_fraction else []))


def _check_batch(batch: Mapping[str, Array], cfg: LossConfig, shape: tuple[int, ...]):
  need = ["targets", "mask", "old_logprobs", "advantages"] + (["ref_logprobs"] if cfg.kl_coef
                                                                else [])
  for key in need:
    if key not in batch:
      raise ValueError(f"actor loss batch: missing field {key!r} (has {sorted(batch)})")
  for key in _selection_fields(cfg):
    if key not in batch:
      raise ValueError(f"actor loss batch: missing field {key!r}, the mini-batch's token "
                       "selection (explore_jax.rl.actor_loss.token_selections)")
  for key in need + _selection_fields(cfg) + (["tis_weights"] if "tis_weights" in batch else []):
    if tuple(batch[key].shape) != shape:
      raise ValueError(f"actor loss batch: field {key!r} has shape {tuple(batch[key].shape)}, "
                       f"expected {shape} [B, T]")


def actor_loss_from_logprobs(logprobs: Array, entropy: Array, batch: Mapping[str, Array],
                             cfg: LossConfig, *, num_tokens=None,
                             num_seqs=None) -> tuple[Array, dict]:
  """The actor loss from log pi(targets) [B, T] and H [B, T] computed by the same forward pass."""
  _check_batch(batch, cfg, tuple(logprobs.shape))
  mask = batch["mask"].astype(bool)
  adv = jnp.where(mask, batch["advantages"].astype(jnp.float32), 0.0)
  agg = dict(num_tokens=num_tokens, num_seqs=num_seqs)

  psi = entropy_term(adv, entropy, mask, cfg)
  pg, metrics = _policy_term(logprobs, batch, adv + psi, mask, cfg, agg)
  loss, local_loss = pg, metrics["actor/pg_loss"]

  entropy_loss = jnp.zeros((), jnp.float32)
  if cfg.entropy_coef:
    loss = loss - cfg.entropy_coef * losses.aggregate(entropy, mask, cfg.agg, **agg)
    entropy_loss = -cfg.entropy_coef * losses.aggregate(entropy, mask, cfg.agg)
  local_loss = local_loss + entropy_loss

  if cfg.kl_coef:
    # Padding positions may hold anything; make their log-ratio exactly 0 before the estimator.
    ref = jnp.where(mask, batch["ref_logprobs"], logprobs)
    kl = losses.kl_penalty(logprobs, ref, cfg.kl_kind)
    loss = loss + cfg.kl_coef * losses.aggregate(kl, mask, cfg.agg, **agg)
    metrics["actor/kl"] = losses.masked_mean(kl, mask)
    metrics["actor/kl_loss"] = cfg.kl_coef * losses.aggregate(kl, mask, cfg.agg)
    local_loss = local_loss + metrics["actor/kl_loss"]

  nonzero = mask & (adv != 0)
  binds = adv_lib.clip_binds(adv, entropy, alpha=cfg.alpha, kappa=cfg.kappa)
  metrics.update({
      "actor/loss": local_loss,
      "actor/entropy": losses.masked_mean(entropy, mask),
      "actor/entropy_loss": entropy_loss,
      "actor/psi_mean": losses.masked_mean(psi, mask),
      # psi / |A| over the tokens that carry a signal (0 when none does): the paper's Fig. ratio.
      "actor/psi_over_abs_adv": losses.masked_mean(psi / jnp.where(nonzero, jnp.abs(adv), 1.0),
                                                   nonzero),
      "actor/adv_mean": losses.masked_mean(adv, mask),
      # Where psi's clip binds (alpha * H > |A| / kappa), on the tokens of responses better and
      # worse than their group's mean; with this alpha and kappa whether or not psi is used.
      **{f"actor/psi_clip_binds_{sign}": losses.masked_mean(binds.astype(jnp.float32), mask & side)
         for sign, side in (("pos", adv > 0), ("neg", adv < 0))},
      "actor/num_tokens": jnp.sum(mask.astype(jnp.float32)),
  })
  return loss, metrics


def entropy_term(adv: Array, entropy: Array, mask: Array, cfg: LossConfig) -> Array:
  """psi [B, T]: the paper's term, its placebo, or 0, as `cfg` says (A' = A + psi)."""
  if cfg.entropy_advantage and cfg.entropy_clip:
    return adv_lib.entropy_advantage(adv, entropy, alpha=cfg.alpha, kappa=cfg.kappa)
  if cfg.entropy_advantage:
    return jnp.where(mask, adv_lib.entropy_offset(entropy, alpha=cfg.alpha), 0.0)
  return jnp.zeros_like(adv)


def _policy_term(logprobs, batch, shaped_adv, mask, cfg: LossConfig, agg: dict):
  """The surrogate `cfg.policy_loss` names, each token's term weighted by the rollout correction
  and the top-entropy mask when they are on: (loss, metrics)."""
  weights = batch["tis_weights"] if "tis_weights" in batch else None
  extra = {}
  if cfg.top_entropy_fraction:
    top = batch["top_entropy"].astype(bool) & mask
    weights = top.astype(jnp.float32) if weights is None else weights * top
    extra["actor/top_entropy_frac"] = losses.masked_mean(top, mask)
  common = dict(agg=cfg.agg, weights=weights, **agg)
  old = batch["old_logprobs"]
  if cfg.policy_loss == "clip_cov":
    loss, metrics = losses.clip_cov_policy_loss(
        logprobs, old, shaped_adv, mask, select=batch["cov_select"], ratio=cfg.clip_cov_ratio,
        lb=cfg.clip_cov_lb, ub=cfg.clip_cov_ub, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        **common)
  elif cfg.policy_loss == "kl_cov":
    loss, metrics = losses.kl_cov_policy_loss(
        logprobs, old, shaped_adv, mask, select=batch["cov_select"], ratio=cfg.kl_cov_ratio,
        kl_coef=cfg.kl_cov_coef, **common)
  else:
    loss, metrics = losses.policy_loss(logprobs, old, shaped_adv, mask, clip_low=cfg.clip_low,
                                       clip_high=cfg.clip_high, clip_c=cfg.clip_c, **common)
  return loss, {**metrics, **extra}


def token_selections(logprobs: Array, entropy: Array, batch: Mapping[str, Array],
                     cfg: LossConfig, *, rng: Array, rows: Array) -> tuple[dict, dict]:
  """The suite's token selections over every token given: ({field: bool [B, T]}, metrics).

  Give it a whole mini-batch (log pi and H [B, T] of the policy the statistics are to describe,
  the batch's `mask`, `old_logprobs`, `advantages`) and hand its fields to the loss of each of
  the mini-batch's micro-batches: `cov_select` (Clip-Cov's random draw keyed by (rng, rows[i],
  position), or KL-Cov's top covariances; the covariance is taken with A' = A + psi, the
  advantage the loss uses) and `top_entropy` (the top-entropy mask). `rows` [B] are the rows' ids
  in the rollout, so a row's draws do not depend on its place in the mini-batch."""
  mask = batch["mask"].astype(bool)
  adv = jnp.where(mask, batch["advantages"].astype(jnp.float32), 0.0)
  shaped = adv + entropy_term(adv, entropy, mask, cfg)
  fields, metrics = {}, {}
  if cfg.policy_loss == "clip_cov":
    kw = dict(lb=cfg.clip_cov_lb, ub=cfg.clip_cov_ub, clip_low=cfg.clip_low,
              clip_high=cfg.clip_high)
    cand = losses.clip_cov_candidates(logprobs, batch["old_logprobs"], shaped, mask, **kw)
    metrics["actor/clip_cov_candidate_frac"] = losses.masked_mean(cand, mask)
    fields["cov_select"] = losses.clip_cov_select(logprobs, batch["old_logprobs"], shaped, mask,
                                                  rng=rng, ratio=cfg.clip_cov_ratio, rows=rows,
                                                  **kw)
  elif cfg.policy_loss == "kl_cov":
    fields["cov_select"] = losses.kl_cov_select(shaped, logprobs, mask, ratio=cfg.kl_cov_ratio,
                                                rows=rows)
  if cfg.top_entropy_fraction:
    fields["top_entropy"] = adv_lib.top_entropy_mask(entropy, mask,
                                                     fraction=cfg.top_entropy_fraction)
  return fields, metrics


def actor_loss(logits: Array, batch: Mapping[str, Array], cfg: LossConfig, *, num_tokens=None,
               num_seqs=None) -> tuple[Array, dict]:
  """The actor loss from logits [B, T, V] (any float dtype): (scalar loss, metrics)."""
  logprobs, entropy = losses.logprobs_and_entropy(logits, batch["targets"])
  return actor_loss_from_logprobs(logprobs, entropy, batch, cfg, num_tokens=num_tokens,
                                  num_seqs=num_seqs)


def actor_loss_from_hidden(hidden: Array, w_out: Array, batch: Mapping[str, Array],
                           cfg: LossConfig, *, chunk: int | None = 512, num_tokens=None,
                           num_seqs=None) -> tuple[Array, dict]:
  """The actor loss from final hidden states [B, T, D] and the output embedding [D, V], forming
  the logits `chunk` tokens at a time (see `losses.token_logprobs_and_entropy`)."""
  logprobs, entropy = losses.token_logprobs_and_entropy(hidden, w_out, batch["targets"],
                                                        chunk=chunk)
  return actor_loss_from_logprobs(logprobs, entropy, batch, cfg, num_tokens=num_tokens,
                                  num_seqs=num_seqs)
