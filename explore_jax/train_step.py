"""The jitted halves of one RL step, between the sampler and the optimizer.

    score_rollout:  rollout + sequence rewards -> training batch (old log-probs from the trainer's
                    own forward pass, values, advantages) + rollout metrics
    update:         several shuffled mini-batch updates of the actor (and critic) over that batch,
                    each accumulated over micro-batches -> new state + metrics

Layout. A row is prompt [P] (left-padded) followed by its response [N]; the logits at position
P - 1 + t predict response token t, so every per-token quantity of the loss is [R, N] and is read
from the hidden states at positions P - 1 .. P + N - 2. The entropy term of the paper lives in
`explore_jax.rl.advantages.entropy_advantage` and is applied inside the actor loss.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from explore_jax.models import qwen2
from explore_jax.rl import actor_loss as actor_lib
from explore_jax.rl import advantages as adv_lib
from explore_jax.rl import losses
from explore_jax.train_state import TrainState

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static (hashable) part of a run's config that the jitted step needs."""

  model: qwen2.Qwen2Config
  loss: actor_lib.LossConfig
  algorithm: str  # "grpo" | "ppo"
  group_size: int
  norm_by_std: bool
  gamma: float
  lam: float
  whiten_advantages: bool
  value_clip: float
  epochs: int
  mini_batch_size: int
  micro_batch_size: int
  logit_chunk: int
  on_nonfinite: str  # "raise" | "skip": either way a non-finite update is not applied


def _batch_constraint(x: Array) -> Array:
  names = ("activation_batch",) + (None,) * (x.ndim - 1)
  return nn.with_logical_constraint(x, names)


def _split(batch: dict, micro: int) -> dict:
  """[R, ...] -> [R / micro, micro, ...]: micro-batches to loop over."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), batch)


def _micro_map(fn, batch: dict, micro: int):
  """fn over micro-batches of `micro` rows (sequentially, to bound memory); results concatenated."""
  out = jax.lax.map(fn, _split(batch, micro))
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def response_hidden(params, tokens: Array, attn_mask: Array, cfg: StepConfig, n: int) -> Array:
  """Hidden states that predict the response tokens: [R, N, D]."""
  hidden = qwen2.forward_hidden(params, tokens, cfg.model, attn_mask)  # [R, P + N, D]
  p = tokens.shape[1] - n
  return hidden[:, p - 1:p - 1 + n]


def response_logprobs(params, tokens, attn_mask, targets, cfg: StepConfig):
  hidden = response_hidden(params, tokens, attn_mask, cfg, targets.shape[1])
  return losses.token_logprobs_and_entropy(hidden, qwen2.output_embedding(params, cfg.model),
                                           targets, chunk=cfg.logit_chunk)


def response_values(critic, tokens, attn_mask, n: int, cfg: StepConfig) -> Array:
  values = qwen2.critic_values(critic, tokens, cfg.model, attn_mask)  # [R, P + N]
  p = tokens.shape[1] - n
  return values[:, p - 1:p - 1 + n]


def _explained_variance(values, returns, mask):
  var = lambda x: losses.masked_mean(jnp.square(x - losses.masked_mean(x, mask)), mask)
  return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_rollout(state: TrainState, ref_params, rollout, scores: Array, *, cfg: StepConfig):
  """Build the training batch from a rollout [R, N] and its sequence rewards [R]."""
  n = rollout.tokens.shape[1]
  batch = {
      "tokens": jnp.concatenate([rollout.prompt_tokens, rollout.tokens], axis=1),
      "attn_mask": jnp.concatenate([rollout.prompt_mask, rollout.mask], axis=1),
      "targets": rollout.tokens,
      "mask": rollout.mask,
  }
  batch = jax.tree.map(_batch_constraint, batch)
  mask = batch["mask"].astype(bool)
  micro = cfg.micro_batch_size

  def logprobs_of(params):
    return _micro_map(lambda b: response_logprobs(params, b["tokens"], b["attn_mask"],
                                                  b["targets"], cfg), batch, micro)

  # Old log-probs for the ratio come from the trainer's forward pass, not the sampler's, so that
  # the first update has ratio exactly 1; the gap between the two is reported.
  old_logprobs, old_entropy = logprobs_of(state.actor)
  batch["old_logprobs"] = jnp.where(mask, old_logprobs, 0.0)
  if ref_params is not None:
    batch["ref_logprobs"] = jnp.where(mask, logprobs_of(ref_params)[0], 0.0)

  metrics = {
      "rollout/logprob_gap": losses.masked_mean(jnp.abs(old_logprobs - rollout.logprobs), mask),
      "rollout/entropy": losses.masked_mean(old_entropy, mask),
  }
  if cfg.algorithm == "grpo":
    seq_adv = adv_lib.grpo_advantages(scores, cfg.group_size, norm_by_std=cfg.norm_by_std)
    batch["advantages"] = adv_lib.per_token(seq_adv, mask)
  else:
    values = _micro_map(lambda b: response_values(state.critic, b["tokens"], b["attn_mask"], n,
                                                  cfg), batch, micro)
    values = jnp.where(mask, values, 0.0)
    token_rewards = adv_lib.reward_at_last_token(scores, mask)
    adv, returns = adv_lib.gae(token_rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
      adv = adv_lib.whiten(adv, mask)
    batch.update(advantages=jnp.where(mask, adv, 0.0), old_values=values, returns=returns)
    metrics["critic/explained_variance"] = _explained_variance(values, returns, mask)
    metrics["critic/old_values_mean"] = losses.masked_mean(values, mask)  # before this update
  metrics["rollout/advantage_abs_mean"] = losses.masked_mean(jnp.abs(batch["advantages"]), mask)
  return batch, metrics


def _accumulate(loss_fn, params, batch: dict, micro: int):
  """Sum of grads and losses over micro-batches; metrics weighted by each micro-batch's tokens."""
  split = _split(batch, micro)
  total = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(acc, mb):
    (loss, metrics), grads = grad_fn(params, mb)
    w = jnp.sum(mb["mask"].astype(jnp.float32)) / total
    metrics = jax.tree.map(lambda m: w * m, metrics)
    return jax.tree.map(jnp.add, acc, (loss, grads, metrics)), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split)))
  (loss, metrics), grads = zeros
  (loss, grads, metrics), _ = jax.lax.scan(body, (loss, grads, metrics), split)
  return loss, grads, metrics


def _apply(tx, params, opt_state, grads, loss):
  """One optimizer step; a non-finite loss or gradient leaves params and optimizer untouched."""
  grad_norm = jax.tree.reduce(lambda a, g: a + jnp.sum(jnp.square(g.astype(jnp.float32))), grads,
                              jnp.zeros((), jnp.float32)) ** 0.5
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  return keep(new_params, params), keep(new_opt, opt_state), grad_norm, finite


@functools.partial(jax.jit, static_argnames=("cfg", "actor_tx", "critic_tx", "train_actor"),
                   donate_argnames=("state",))
def update(state: TrainState, batch: dict, *, cfg: StepConfig, actor_tx, critic_tx,
           train_actor: bool):
  """All mini-batch updates of one rollout: epochs x (rows / mini_batch_size) optimizer steps."""
  rows = batch["mask"].shape[0]
  mini = cfg.mini_batch_size
  rng = jax.random.fold_in(state.rng, state.step)
  perms = jnp.concatenate([jax.random.permutation(jax.random.fold_in(rng, e), rows)
                           for e in range(cfg.epochs)]).reshape(-1, mini)  # [U, M]

  def actor_loss_fn(params, mb):
    num_tokens = mb.pop("num_tokens")
    num_seqs = mb.pop("num_seqs")
    hidden = response_hidden(params, mb["tokens"], mb["attn_mask"], cfg, mb["targets"].shape[1])
    return actor_lib.actor_loss_from_hidden(
        hidden, qwen2.output_embedding(params, cfg.model), mb, cfg.loss, chunk=cfg.logit_chunk,
        num_tokens=num_tokens, num_seqs=num_seqs)

  def critic_loss_fn(params, mb):
    num_tokens = mb.pop("num_tokens")
    mb.pop("num_seqs")
    values = response_values(params, mb["tokens"], mb["attn_mask"], mb["targets"].shape[1], cfg)
    return losses.value_loss(values, mb["old_values"], mb["returns"], mb["mask"],
                             clip=cfg.value_clip, num_tokens=num_tokens)

  def one_update(state: TrainState, idx):
    mb = jax.tree.map(lambda x: _batch_constraint(jnp.take(x, idx, axis=0)), batch)
    mask = mb["mask"].astype(jnp.float32)
    # Global counts of the mini-batch, so that micro-batch losses sum to the mini-batch mean.
    counts = {"num_tokens": jnp.broadcast_to(jnp.sum(mask), (mini,)),
              "num_seqs": jnp.broadcast_to(jnp.sum(jnp.any(mask > 0, axis=1)), (mini,))}
    mb = {**mb, **counts}
    unpack = lambda f: lambda p, m: f(p, {**m, "num_tokens": m["num_tokens"][0],
                                          "num_seqs": m["num_seqs"][0]})
    metrics = {}
    if train_actor:
      loss, grads, m = _accumulate(unpack(actor_loss_fn), state.actor, mb, cfg.micro_batch_size)
      actor, actor_opt, gnorm, finite = _apply(actor_tx, state.actor, state.actor_opt, grads, loss)
      state = state.replace(actor=actor, actor_opt=actor_opt)
      metrics.update(m)
      metrics.update({"actor/loss": loss, "actor/grad_norm": gnorm,
                      "actor/update_finite": finite.astype(jnp.float32)})
    if cfg.algorithm == "ppo":
      loss, grads, m = _accumulate(unpack(critic_loss_fn), state.critic, mb, cfg.micro_batch_size)
      critic, critic_opt, gnorm, finite = _apply(critic_tx, state.critic, state.critic_opt, grads,
                                                 loss)
      state = state.replace(critic=critic, critic_opt=critic_opt)
      metrics.update(m)
      metrics.update({"critic/vf_loss": loss, "critic/grad_norm": gnorm,
                      "critic/update_finite": finite.astype(jnp.float32)})
    return state, metrics

  state, metrics = jax.lax.scan(one_update, state, perms)
  # Means over the updates, except the finiteness flags, which must hold for every update.
  out = {k: (jnp.min(v) if k.endswith("update_finite") else jnp.mean(v)) for k, v in metrics.items()}
  out.pop("actor/num_tokens", None)
  return state.replace(step=state.step + 1), out
