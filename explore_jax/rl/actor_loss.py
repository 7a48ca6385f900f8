"""The whole actor loss in one place: PPO/GRPO surrogate + entropy advantage + regulariser + KL.

    H_t   = entropy of pi(. | s_t) at temperature 1, from the SAME forward pass as log pi(a_t | s_t)
    A'_t  = A_t + psi_t,  psi_t = min(alpha * stop_gradient(H_t), |A_t| / kappa)   (if enabled)
    loss  = policy_loss(log pi, log pi_old, A')  -  entropy_coef * agg(H)  +  kl_coef * agg(KL)

The three extras are switched by `LossConfig` and nowhere else:
  * `entropy_advantage` is the paper's method (Cheng et al., arXiv 2506.14758): it only reweights
    tokens, so the gradient equals that of the plain loss with A' precomputed as a constant;
  * `entropy_coef` (beta) is the entropy regulariser of the paper's Table 3 baseline: gradient does
    flow through H;
  * `kl_coef` adds a KL penalty to a reference policy (`ref_logprobs` must be in the batch).

The batch is a mapping of [B, T] arrays: `targets` (int: the token whose log-prob logits[:, t]
scores), `mask` (response tokens), `old_logprobs`, `advantages` (unshaped A), and `ref_logprobs`
when kl_coef > 0. `num_tokens` / `num_seqs` are the mini-batch's counts for gradient accumulation
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

Array = jax.Array


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

  def __post_init__(self):
    if self.agg not in losses.AGG_MODES:
      raise ValueError(f"LossConfig.agg={self.agg!r}: use one of {losses.AGG_MODES}")
    if self.kl_kind not in losses.KL_KINDS:
      raise ValueError(f"LossConfig.kl_kind={self.kl_kind!r}: use one of {losses.KL_KINDS}")
    if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
      raise ValueError(f"LossConfig.clip_low={self.clip_low}, clip_high={self.clip_high}: need "
                       "0 <= clip_low < 1 and clip_high >= 0")
    if self.clip_c is not None and not self.clip_c > 1:
      raise ValueError(f"LossConfig.clip_c={self.clip_c}: must be > 1, or None for no dual clip")
    if self.alpha < 0 or self.kappa <= 0:
      raise ValueError(f"LossConfig.alpha={self.alpha}, kappa={self.kappa}: need alpha >= 0 and "
                       "kappa > 0 (kappa > 1 for psi never to flip the sign of an advantage)")


def _check_batch(batch: Mapping[str, Array], cfg: LossConfig, shape: tuple[int, ...]):
  need = ["targets", "mask", "old_logprobs", "advantages"] + (["ref_logprobs"] if cfg.kl_coef
                                                                else [])
  for key in need:
    if key not in batch:
      raise ValueError(f"actor loss batch: missing field {key!r} (has {sorted(batch)})")
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

  if cfg.entropy_advantage and cfg.entropy_clip:
    psi = adv_lib.entropy_advantage(adv, entropy, alpha=cfg.alpha, kappa=cfg.kappa)
  elif cfg.entropy_advantage:
    psi = jnp.where(mask, adv_lib.entropy_offset(entropy, alpha=cfg.alpha), 0.0)
  else:
    psi = jnp.zeros_like(adv)
  pg, metrics = losses.policy_loss(logprobs, batch["old_logprobs"], adv + psi, mask,
                                   clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                   clip_c=cfg.clip_c, agg=cfg.agg, **agg)
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
