"""The jitted halves of one RL step, between the sampler and the optimizer.

    score_rollout:  rollout + sequence rewards -> training batch (old log-probs from the trainer's
                    own forward pass, values, advantages) + rollout metrics
    update:         several shuffled mini-batch updates of the actor (and critic) over that batch,
                    each accumulated over micro-batches -> new state + metrics

Layout. A row is prompt [P] (left-padded) followed by its response [N]; the logits at position
P - 1 + t predict response token t, so every per-token quantity of the loss is [R, N] and is read
from the hidden states at positions P - 1 .. P + N - 2. The entropy term of the paper lives in
`explore_jax.rl.advantages.entropy_advantage` and is applied inside the actor loss.

Length buckets (`length_buckets` > 1). Most rows are far shorter than P + N (short prompts, early
EOS), and a forward/backward over their padding is wasted. With buckets, the rows of each
mini-batch (and of the old-log-prob pass) are sorted by their real length, each row is moved left
over its prompt padding, and each micro-batch runs at the shortest of `length_buckets` static
lengths that holds all its rows (`lax.switch` over one compiled branch per length): the model body
over that many positions, the output projection and loss over no more response slots than that.
The loss and the update are the same sums over the same tokens (equal up to float rounding); only
padding is skipped. Metrics averaged per micro-batch with token weights (e.g.
`actor/psi_over_abs_adv`, a `seq-mean-*` pg_loss) may differ slightly, since rows are grouped
differently. This needs what the sampler produces and checks: prompts left-padded with at least
one real token, responses contiguous.

The exploration suite's statistics (Clip-Cov's and KL-Cov's covariance, its top-k and random
draw, the top-entropy threshold; explore_jax.rl.actor_loss.token_selections) are taken over every
token of a mini-batch update, never per micro-batch: verl takes them per micro-batch of each GPU,
so there a method selects other tokens when the micro-batch size or the GPU count changes. Each
mini-batch update therefore runs in two passes:
  1. `mini_batch_selections`: the log-probs and entropies of the whole mini-batch [M, N] (with
     `token_stats="current"`, the default, a forward pass of the policy about to be updated, in
     micro-batches: exactly the values every micro-batch's loss then computes, since the
     parameters do not change within a mini-batch; with "old", the scoring pass's, which cost
     nothing and are equal on a rollout's first mini-batch only), then the selections as bool
     [M, N] arrays over all of them. The arrays are global (rows sharded over the batch axes), so
     XLA takes the means and the sort across shards and processes.
  2. the accumulation as before, each micro-batch's loss reading its rows of the selections
     (`cov_select`, `top_entropy`) instead of choosing its own.
Clip-Cov's draw gives each token random bits keyed by (the update's key, the token's row in the
rollout, its position), so a token's fate does not depend on where its row sits. The cost of pass
1 ("current"): one forward pass over the mini-batch, without the backward (measured by
benchmarks/suite_stats.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from explore_jax.models import attention as attention_lib
from explore_jax.models import qwen2
from explore_jax.rl import actor_loss as actor_lib
from explore_jax.rl import advantages as adv_lib
from explore_jax.rl import losses
from explore_jax.train import digest
from explore_jax.train.state import TrainState

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
  length_buckets: int = 1  # static row lengths a micro-batch may be cut to; 1 = always P + N
  passk_k: int = 0  # > 0: GRPO's advantage replaced by the analytic pass@k one (needs `correct`)
  tis_cap: float = 0.0  # > 0: rollout correction (losses.tis_weights) with this cap
  tis_mode: str = "token"  # losses.TIS_MODES
  # Whose log-probs / entropies the suite's mini-batch statistics describe: "current" (a forward
  # pass of the policy being updated, before the mini-batch's update) or "old" (the scoring pass's)
  token_stats: str = "current"


def _batch_constraint(x: Array) -> Array:
  names = ("activation_batch",) + (None,) * (x.ndim - 1)
  return nn.with_logical_constraint(x, names)


def _split(batch: dict, micro: int) -> dict:
  """[R, ...] -> [R / micro, micro, ...]: micro-batches to loop over."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), batch)


def _merge(tree):
  """The inverse of `_split`: [R / micro, micro, ...] -> [R, ...]."""
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def bucket_lengths(total: int, count: int, multiple: int = 8) -> tuple[int, ...]:
  """`count` row lengths up to `total` (P + N), evenly spaced, rounded up to multiples of
  `multiple` (8; splash attention's block of 128, see `attention.length_multiple`), the last
  being `total` itself."""
  if count < 1:
    raise ValueError(f"rl.length_buckets={count}: need at least 1")
  return tuple(sorted({min(total, math.ceil(total * k / count / multiple) * multiple)
                       for k in range(1, count + 1)}))


def row_lengths(attn_mask: Array, n: int) -> Array:
  """[R] positions a row needs once moved left over its prompt padding: its prompt and response
  but the last response token (which is predicted, never read)."""
  p = attn_mask.shape[1] - n
  prompt_len = jnp.sum(attn_mask[:, :p], axis=1)
  response_end = jnp.max(jnp.where(attn_mask[:, p:] > 0, jnp.arange(1, n + 1), 0), axis=1)
  return prompt_len + response_end - 1


def _left_aligned(tokens: Array, attn_mask: Array, n: int):
  """Rows rolled left by their prompt padding (which moves to the end, still masked)."""
  t = tokens.shape[1]
  prompt_len = jnp.sum(attn_mask[:, :t - n], axis=1)
  cols = (jnp.arange(t)[None, :] + (t - n - prompt_len)[:, None]) % t
  take = lambda x: jnp.take_along_axis(x, cols, axis=1)
  return take(tokens), take(attn_mask), prompt_len


def _at_response(x: Array, prompt_len: Array, n: int) -> Array:
  """x [R, L, ...] of left-aligned rows -> the N positions that predict the response tokens.

  Positions past L belong to padding (their loss terms are masked); they read position L - 1."""
  idx = jnp.clip(prompt_len[:, None] - 1 + jnp.arange(n)[None, :], 0, x.shape[1] - 1)
  return jnp.take_along_axis(x, idx.reshape(*idx.shape, *(1,) * (x.ndim - 2)), axis=1)


def _micro_map(fn, batch: dict, micro: int, lengths: tuple[int, ...] = ()):
  """fn(micro_batch, length) over micro-batches of `micro` rows, sequentially (to bound memory);
  results concatenated in row order. With several `lengths`, rows are sorted by length first and
  each micro-batch gets the shortest length that holds it (see the module docstring)."""
  if len(lengths) <= 1:
    return _merge(jax.lax.map(lambda b: fn(b, None), _split(batch, micro)))
  order = jnp.argsort(row_lengths(batch["attn_mask"], batch["targets"].shape[1]))
  out = jax.lax.map(lambda b: _by_length(fn, b, lengths)[0], _split(_take(batch, order), micro))
  return _take(_merge(out), jnp.argsort(order))  # back to the rows' own order


def _take(tree, idx: Array):
  return jax.tree.map(lambda x: _batch_constraint(jnp.take(x, idx, axis=0)), tree)


def _by_length(fn, mb: dict, lengths: tuple[int, ...], *args):
  """fn(*args, mb, length) at the shortest of `lengths` that holds every row of mb, and that
  length (a traced int)."""
  need = jnp.max(row_lengths(mb["attn_mask"], mb["targets"].shape[1]))
  branches = [functools.partial(lambda length, *a: (fn(*a, length), jnp.int32(length)), length)
              for length in lengths]
  return jax.lax.switch(jnp.searchsorted(jnp.asarray(lengths), need), branches, *args, mb)


# [R, N] fields of a batch, cut with the hidden states when a micro-batch runs at a shorter length.
RESPONSE_FIELDS = ("targets", "mask", "old_logprobs", "advantages", "ref_logprobs", "old_values",
                   "returns", "old_entropy", "tis_weights", "cov_select", "top_entropy")


def response_slots(n: int, length: int | None) -> int:
  """Response slots that can hold a token in a micro-batch of `length` positions: a row needs
  prompt (>= 1 token) + response - 1 positions, so no response there is longer than `length`."""
  return n if length is None else min(n, length)


def _first_slots(mb: dict, slots: int) -> dict:
  return {k: v[:, :slots] if k in RESPONSE_FIELDS else v for k, v in mb.items()}


def _pad_slots(x: Array, n: int) -> Array:
  return jnp.pad(x, ((0, 0), (0, n - x.shape[1])))


def _at_response_positions(forward, tokens: Array, attn_mask: Array, n: int,
                           length: int | None) -> Array:
  """forward(tokens, attn_mask) -> [R, T, ...] read at the positions that predict the response
  tokens: [R, N, ...]. With a `length`, the rows are left-aligned, only their first `length`
  positions are computed, and only the first `response_slots(N, length)` slots are returned."""
  if length is None:
    p = tokens.shape[1] - n
    return forward(tokens, attn_mask)[:, p - 1:p - 1 + n]
  tokens, attn_mask, prompt_len = _left_aligned(tokens, attn_mask, n)
  out = forward(tokens[:, :length], attn_mask[:, :length])
  return _at_response(out, prompt_len, response_slots(n, length))


def response_hidden(params, tokens: Array, attn_mask: Array, cfg: StepConfig, n: int,
                    length: int | None = None) -> Array:
  """Final hidden states that predict the response tokens: [R, N, D] (fewer slots with a
  `length`, see `_at_response_positions`)."""
  forward = lambda t, m: qwen2.forward_hidden(params, t, cfg.model, m)
  return _at_response_positions(forward, tokens, attn_mask, n, length)


def response_logprobs(params, tokens, attn_mask, targets, cfg: StepConfig, length=None):
  """log pi(targets) and H, [R, N] each (0 in slots past a shorter `length`)."""
  n = targets.shape[1]
  hidden = response_hidden(params, tokens, attn_mask, cfg, n, length)
  out = losses.token_logprobs_and_entropy(hidden, qwen2.output_embedding(params, cfg.model),
                                          targets[:, :hidden.shape[1]], chunk=cfg.logit_chunk)
  return tuple(_pad_slots(x, n) for x in out)


def response_values(critic, tokens, attn_mask, n: int, cfg: StepConfig, length=None) -> Array:
  """Critic values [R, N] at the positions that predict the response tokens."""
  forward = lambda t, m: qwen2.critic_values(critic, t, cfg.model, m)
  return _pad_slots(_at_response_positions(forward, tokens, attn_mask, n, length), n)


def _lengths(cfg: StepConfig, batch: dict) -> tuple[int, ...]:
  m = cfg.model
  return bucket_lengths(batch["tokens"].shape[1], cfg.length_buckets,
                        attention_lib.length_multiple(m.attention, m.head_dim, m.dtype))


def _explained_variance(values, returns, mask):
  var = lambda x: losses.masked_mean(jnp.square(x - losses.masked_mean(x, mask)), mask)
  return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_rollout(state: TrainState, ref_params, rollout, scores: Array, correct=None, *,
                  cfg: StepConfig):
  """Build the training batch from a rollout [R, N] and its sequence rewards [R] (and, for the
  pass@k advantage, which responses were graded correct [R])."""
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

  lengths = _lengths(cfg, batch)

  def logprobs_of(params):
    return _micro_map(lambda b, length: response_logprobs(
        params, b["tokens"], b["attn_mask"], b["targets"], cfg, length), batch, micro, lengths)

  # Old log-probs for the ratio come from the trainer's forward pass, not the sampler's, so that
  # the first update has ratio exactly 1; the gap between the two is reported.
  old_logprobs, old_entropy = logprobs_of(state.actor)
  batch["old_logprobs"] = jnp.where(mask, old_logprobs, 0.0)
  batch["old_entropy"] = jnp.where(mask, old_entropy, 0.0)
  if ref_params is not None:
    batch["ref_logprobs"] = jnp.where(mask, logprobs_of(ref_params)[0], 0.0)

  metrics = {
      "rollout/logprob_gap": losses.masked_mean(jnp.abs(old_logprobs - rollout.logprobs), mask),
      "rollout/entropy": losses.masked_mean(old_entropy, mask),
      # The first response token: on countdown the choice of the first number to combine, a
      # fork that decides the attempt.
      "rollout/entropy_first_token": losses.masked_mean(old_entropy[:, :1], mask[:, :1]),
  }
  if cfg.algorithm == "grpo":
    batch["advantages"] = adv_lib.per_token(_group_advantages(scores, correct, cfg), mask)
  else:
    values = _micro_map(lambda b, length: response_values(
        state.critic, b["tokens"], b["attn_mask"], n, cfg, length), batch, micro, lengths)
    values = jnp.where(mask, values, 0.0)
    token_rewards = adv_lib.reward_at_last_token(scores, mask)
    adv, returns = adv_lib.gae(token_rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
      adv = adv_lib.whiten(adv, mask)
    batch.update(advantages=jnp.where(mask, adv, 0.0), old_values=values, returns=returns)
    metrics["critic/explained_variance"] = _explained_variance(values, returns, mask)
    metrics["critic/old_values_mean"] = losses.masked_mean(values, mask)  # before this update
  metrics["rollout/advantage_abs_mean"] = losses.masked_mean(jnp.abs(batch["advantages"]), mask)
  if cfg.tis_cap:
    batch, tis_metrics = _rollout_correction(batch, rollout.logprobs, cfg)
    metrics.update(tis_metrics)
  return batch, metrics


def _group_advantages(scores: Array, correct, cfg: StepConfig) -> Array:
  """[R] advantages of GRPO's groups: normalised rewards, or the pass@k advantage."""
  if not cfg.passk_k:
    return adv_lib.grpo_advantages(scores, cfg.group_size, norm_by_std=cfg.norm_by_std)
  if correct is None:
    raise ValueError("score_rollout: the pass@k advantage (rl.passk) needs `correct`, which "
                     "responses were graded correct")
  return adv_lib.passk_advantages(correct, cfg.group_size, k=cfg.passk_k)


def _rollout_correction(batch: dict, sampler_logprobs: Array, cfg: StepConfig):
  """The batch with `tis_weights` (and, in token_mask mode, its dropped tokens out of `mask`):
  old log-probs against the sampler's (losses.tis_weights), and the weights' metrics."""
  mask = batch["mask"].astype(bool)
  w = losses.tis_weights(batch["old_logprobs"], sampler_logprobs, mask, cap=cfg.tis_cap,
                         mode=cfg.tis_mode)
  kept = mask & (w > 0) if cfg.tis_mode == "token_mask" else mask
  capped = jnp.zeros_like(mask) if cfg.tis_mode == "token_mask" else w >= cfg.tis_cap
  metrics = {"rollout/tis_weight_mean": losses.masked_mean(w, mask),
             # 1 for a rollout without tokens: a metric stays finite
             "rollout/tis_weight_min": jnp.where(jnp.any(mask),
                                                 jnp.min(jnp.where(mask, w, jnp.inf)), 1.0),
             "rollout/tis_dropped_frac": losses.masked_mean(~kept, mask),
             "rollout/tis_capped_frac": losses.masked_mean(capped, mask)}
  batch = dict(batch, tis_weights=w, mask=kept.astype(batch["mask"].dtype))
  return batch, metrics


def _accumulate(loss_fn, params, batch: dict, micro: int, lengths: tuple[int, ...]):
  """Sum of grads and losses over micro-batches; metrics weighted by each micro-batch's tokens.

  loss_fn(params, micro_batch, length); with several `lengths` each micro-batch runs at the
  shortest that holds it. Also returns the mean length of the model body's pass as a fraction
  of P + N."""
  split = _split(batch, micro)
  total = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  full = batch["tokens"].shape[1]

  def body(acc, mb):
    if len(lengths) <= 1:
      ((loss, metrics), grads), length = grad_fn(params, mb, None), full
    else:
      ((loss, metrics), grads), length = _by_length(grad_fn, mb, lengths, params)
    frac = jnp.asarray(length, jnp.float32) / full
    w = jnp.sum(mb["mask"].astype(jnp.float32)) / total
    metrics = jax.tree.map(lambda m: w * m, metrics)
    return jax.tree.map(jnp.add, acc, (loss, grads, metrics)), frac

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      grad_fn, params, jax.tree.map(lambda x: x[0], split), None))
  (loss, metrics), grads = zeros
  (loss, grads, metrics), fracs = jax.lax.scan(body, (loss, grads, metrics), split)
  return loss, grads, metrics, jnp.mean(fracs)


def _all_finite(x: Array) -> Array:
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.bool_(True)  # counters
  return jnp.all(jnp.isfinite(x))


def nonfinite_names(params, opt_state) -> list[str]:
  """What `_apply`'s `nonfinite_at` index names: the loss, the gradient, each leaf of the new
  optimizer state, each leaf of the new parameters (pytrees or their shapes)."""
  leaves = lambda what, tree: [f"{what} {name}" for name in digest.names(tree)]
  return (["loss", "gradient norm"] + leaves("optimizer state", opt_state)
          + leaves("parameter", params))


# Folded into an update's key for the suite's random draws (Clip-Cov); the epochs' shuffles use
# 0 .. epochs - 1.
SELECT_STREAM = 1 << 30


def mini_batch_selections(params, mb: dict, rows: Array, rng: Array, cfg: StepConfig,
                          lengths: tuple[int, ...] = ()):
  """The suite's token selections over a whole mini-batch (module docstring): ({field: bool
  [M, N]}, metrics). With token_stats "current", from a forward pass of `params` (the policy
  about to be updated, so the log-probs and entropies every micro-batch's loss will see), in
  micro-batches; with "old", from the scoring pass's, at no cost."""
  if cfg.token_stats == "current":
    logp, entropy = _micro_map(lambda b, length: response_logprobs(
        params, b["tokens"], b["attn_mask"], b["targets"], cfg, length), mb,
        cfg.micro_batch_size, lengths)
  else:
    logp, entropy = mb["old_logprobs"], mb["old_entropy"]
  return actor_lib.token_selections(jax.lax.stop_gradient(logp), jax.lax.stop_gradient(entropy),
                                    mb, cfg.loss, rng=rng, rows=rows)


def _apply(tx, params, opt_state, grads, loss):
  """One optimizer step that lands only if all it produces is finite: the loss, the gradient,
  the new optimizer state and the new parameters (a finite loss and gradient still overflow
  under a huge learning rate, and a non-finite moment spreads to its parameters). Otherwise
  params and optimizer state stay as they were, counters included.

  Returns (params, opt_state, grad_norm, nonfinite_at): -1 when the step landed, else the index
  in `nonfinite_names` of the first non-finite quantity. The check is one reduction per leaf
  of the new values; the select that follows reads them again rather than keeping a copy
  (docs/reliability.md has the TPU compiler's memory figures)."""
  grad_norm = jax.tree.reduce(lambda a, g: a + jnp.sum(jnp.square(g.astype(jnp.float32))), grads,
                              jnp.zeros((), jnp.float32)) ** 0.5
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
  flags = jnp.stack([jnp.isfinite(loss), jnp.isfinite(grad_norm)]
                    + [_all_finite(x) for x in jax.tree.leaves(new_opt)]
                    + [_all_finite(x) for x in jax.tree.leaves(new_params)])
  finite = jnp.all(flags)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  at = jnp.where(finite, -1, jnp.argmin(flags)).astype(jnp.int32)
  return keep(new_params, params), keep(new_opt, opt_state), grad_norm, at


def _landed(part: str, at: Array) -> dict:
  """A mini-batch update's finiteness metrics (`_apply`'s `nonfinite_at`)."""
  return {f"{part}/update_finite": (at < 0).astype(jnp.float32),
          f"{part}/updates_dropped": (at >= 0).astype(jnp.float32),
          f"{part}/nonfinite_at": at.astype(jnp.float32)}


def _over_updates(key: str, v: Array) -> Array:
  """A metric's value for the step from its value per mini-batch update [U]."""
  if key.endswith("update_finite"):
    return jnp.min(v)  # 1 only if every update landed
  if key.endswith("updates_dropped"):
    return jnp.sum(v)
  if key.endswith("nonfinite_at"):
    return v[jnp.argmax(v >= 0)]  # the first dropped update's (-1: none)
  return jnp.mean(v)


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

  lengths = _lengths(cfg, batch)
  if len(lengths) > 1:  # micro-batches of rows of similar length (the sum is the same)
    need = row_lengths(batch["attn_mask"], batch["targets"].shape[1])
    perms = jnp.take_along_axis(perms, jnp.argsort(need[perms], axis=1), axis=1)

  def actor_loss_fn(params, mb, length):
    num_tokens = mb.pop("num_tokens")
    num_seqs = mb.pop("num_seqs")
    hidden = response_hidden(params, mb["tokens"], mb["attn_mask"], cfg, mb["targets"].shape[1],
                             length)
    return actor_lib.actor_loss_from_hidden(
        hidden, qwen2.output_embedding(params, cfg.model), _first_slots(mb, hidden.shape[1]),
        cfg.loss, chunk=cfg.logit_chunk, num_tokens=num_tokens, num_seqs=num_seqs)

  def critic_loss_fn(params, mb, length):
    num_tokens = mb.pop("num_tokens")
    mb.pop("num_seqs")
    values = response_values(params, mb["tokens"], mb["attn_mask"], mb["targets"].shape[1], cfg,
                             length)
    return losses.value_loss(values, mb["old_values"], mb["returns"], mb["mask"],
                             clip=cfg.value_clip, num_tokens=num_tokens)

  select_rng = jax.random.fold_in(rng, SELECT_STREAM)

  def one_update(state: TrainState, xs):
    idx, u = xs  # the mini-batch's rows in the rollout [M], its number
    mb = _take(batch, idx)
    selected = {}
    if train_actor and cfg.loss.selects_tokens:
      fields, selected = mini_batch_selections(state.actor, mb, idx,
                                               jax.random.fold_in(select_rng, u), cfg, lengths)
      mb = {**mb, **fields}
    mask = mb["mask"].astype(jnp.float32)
    # Global counts of the mini-batch, so that micro-batch losses sum to the mini-batch mean.
    counts = {"num_tokens": jnp.broadcast_to(jnp.sum(mask), (mini,)),
              "num_seqs": jnp.broadcast_to(jnp.sum(jnp.any(mask > 0, axis=1)), (mini,))}
    mb = {**mb, **counts}
    unpack = lambda f: lambda p, m, length: f(p, {**m, "num_tokens": m["num_tokens"][0],
                                                  "num_seqs": m["num_seqs"][0]}, length)
    metrics = {}
    if train_actor:
      loss, grads, m, frac = _accumulate(unpack(actor_loss_fn), state.actor, mb,
                                         cfg.micro_batch_size, lengths)
      actor, actor_opt, gnorm, at = _apply(actor_tx, state.actor, state.actor_opt, grads, loss)
      state = state.replace(actor=actor, actor_opt=actor_opt)
      metrics.update(m)
      metrics.update(selected)
      metrics.update({"actor/loss": loss, "actor/grad_norm": gnorm,
                      **_landed("actor", at), "perf/update_length_frac": frac})
    if cfg.algorithm == "ppo":
      loss, grads, m, frac = _accumulate(unpack(critic_loss_fn), state.critic, mb,
                                         cfg.micro_batch_size, lengths)
      critic, critic_opt, gnorm, at = _apply(critic_tx, state.critic, state.critic_opt, grads,
                                             loss)
      state = state.replace(critic=critic, critic_opt=critic_opt)
      metrics.update(m)
      metrics.update({"critic/vf_loss": loss, "critic/grad_norm": gnorm,
                      **_landed("critic", at), "perf/update_length_frac": frac})
    return state, metrics

  state, metrics = jax.lax.scan(one_update, state, (perms, jnp.arange(perms.shape[0])))
  out = {k: _over_updates(k, v) for k, v in metrics.items()}
  out.pop("actor/num_tokens", None)
  return state.replace(step=state.step + 1), out
