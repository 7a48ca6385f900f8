"""One step's experience: sample `rollout.n` responses per prompt (in waves), grade them, and the
rollout's own metrics. Every process tokenizes and grades only its slice of the global batch.

DAPO's two changes to the experience live here too (Yu et al. 2025): the overlong shaping of the
reward (`shaped_rewards`) and dynamic sampling (`sample_with_signal`: groups whose rewards are
all equal carry no GRPO signal, so they are dropped and more prompts sampled)."""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from explore_jax import rewards as rewards_lib
from explore_jax.data import countdown, templates
from explore_jax.rollout import sampling
from explore_jax import rollout as rollout_lib
from explore_jax.tpu import sharding


def encode_prompts(tokenizer, texts: list[str], max_len: int, pad_id: int):
  """Left-padded [B, max_len] tokens and mask; over-long prompts keep their last tokens."""
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
  truncated = sum(len(row) > max_len for row in ids)
  tokens, mask = sampling.left_pad([row[-max_len:] for row in ids], pad_id, max_len)
  return tokens, mask, truncated / max(len(ids), 1)


def process_slice(batch: list) -> list:
  """This process's contiguous share of a global batch (the rows its devices hold)."""
  local = len(batch) // jax.process_count()
  return batch[jax.process_index() * local:(jax.process_index() + 1) * local]


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array [R, ...], in global order: the rows its devices hold
  when the array is split over the batch axes; of an array whose rows are not split (each
  process holds all of them), the share `process_slice` takes."""
  shards = {s.index[0].start or 0: s for s in x.addressable_shards}
  rows = np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)], axis=0)
  return process_slice(rows) if len(rows) == x.shape[0] else rows


class Experience(NamedTuple):
  """A step's graded rollout: global arrays with prompt-major rows (groups of rollout.n)."""
  rollout: sampling.Rollout
  scores: jax.Array  # [R] float32 rewards (with the overlong shaping when on)
  correct: jax.Array  # [R] float32, 1 where the grader accepted the answer
  prompt_truncated: float  # share of prompts cut to data.max_prompt_len
  timing: dict  # seconds and rates for the step's metrics


def shaped_rewards(graded: np.ndarray, lengths: np.ndarray, config) -> np.ndarray:
  """The grader's rewards plus DAPO's overlong penalty on the response lengths (in tokens) when
  `reward.overlong_buffer` > 0 (rewards.overlong_penalty)."""
  if not config.reward.overlong_buffer:
    return graded
  return graded + rewards_lib.overlong_penalty(lengths, config.rollout.max_new_tokens,
                                               config.reward.overlong_buffer,
                                               config.reward.overlong_penalty)


def sample_and_grade(config, model_cfg, params, records, tokenizer, pool, mesh, rules, rng,
                     eos_id: int, pad_id: int) -> Experience:
  """Sample `rollout.n` responses per prompt, in waves of `rollout.prompts_per_wave` prompts (the
  KV cache of a whole 7B rollout does not fit at once), and grade them.

  `records` is the global batch. Every process tokenizes and grades only its own slice of each
  wave; the rollout and the rewards are global arrays whose rows are prompt-major in the order of
  `records`, however many processes share the work.
  """
  n = config.rollout.n
  wave = config.rollout.prompts_per_wave or config.data.prompts_per_step
  if config.rollout.engine in ("continuous", "paged"):  # slots / pages bound the memory: one call
    wave = config.data.prompts_per_step
  rollouts, scores, correct, truncated = [], [], [], []
  timing = {"rollout": 0.0, "reward": 0.0}
  busy = slot_steps = retried = 0
  for w, first in enumerate(range(0, len(records), wave)):
    chunk = process_slice(records[first:first + wave])
    t0 = time.perf_counter()
    texts = [templates.apply_template(config.data.template, r["problem"], tokenizer)
             for r in chunk]
    tokens, mask, trunc = encode_prompts(tokenizer, texts, config.data.max_prompt_len, pad_id)
    rows_sharding = sharding.logical_sharding(("batch",), (wave,), mesh, rules)
    put = lambda x: jax.make_array_from_process_local_data(rows_sharding, x)
    # A row's draws depend on (rng, its prompt's index in the step, its sample): the same
    # rollout from either engine, however the step is cut into waves.
    rollout, stats = rollout_lib.generate(
        model_cfg, params, put(tokens), put(mask), rng,
        max_new_tokens=config.rollout.max_new_tokens, temperature=config.rollout.temperature,
        top_p=config.rollout.top_p, top_k=config.rollout.top_k, eos_id=eos_id, n=n, mesh=mesh,
        prompt_index=np.arange(first, first + wave), engine=config.rollout.engine,
        slots=config.rollout.slots, chunk=config.rollout.chunk, kv_block=config.rollout.kv_block,
        refill_share=config.rollout.refill_share, kv_pages=config.rollout.kv_pages,
        page_size=config.rollout.page_size, page_block=config.rollout.page_block,
        page_attention=config.rollout.page_attention, with_stats=True)
    jax.block_until_ready(rollout.tokens)
    busy += int(stats["busy_slot_steps"])
    slot_steps += int(stats["slot_steps"])
    t1 = time.perf_counter()
    resp_tokens, resp_len = local_rows(rollout.tokens), local_rows(rollout.lengths)
    responses = tokenizer.batch_decode(
        [row[:k] for row, k in zip(resp_tokens.tolist(), resp_len.tolist())],
        skip_special_tokens=True)
    answers = [r["answer"] for r in chunk for _ in range(n)]
    retried += sum(countdown.count_retries(text) > 0 for text in responses)
    graded = pool.score(responses, answers, method=config.reward.method,
                        correct_reward=config.reward.correct,
                        incorrect_reward=config.reward.incorrect)
    put_rows = lambda x: jax.make_array_from_process_local_data(
        sharding.logical_sharding(("batch",), (wave * n,), mesh, rules), np.asarray(x, np.float32))
    scores.append(put_rows(shaped_rewards(graded, resp_len, config)))
    correct.append(put_rows(graded >= config.reward.correct))
    rollouts.append(rollout)
    truncated.append(trunc)
    timing["rollout"] += t1 - t0
    timing["reward"] += time.perf_counter() - t1
  timing["slot_utilization"] = busy / max(slot_steps, 1)
  # Responses that checked a wrong value and tried again (countdown's verify-and-retry).
  timing["retry_frac"] = int(sharding.gather_ints([retried]).sum()) / len(records) / n
  if len(rollouts) == 1:
    return Experience(rollouts[0], scores[0], correct[0], truncated[0], timing)
  cat = lambda *xs: jnp.concatenate(xs, axis=0)
  return Experience(jax.tree.map(cat, *rollouts), cat(*scores), cat(*correct),
                    float(np.mean(truncated)), timing)


def sample_with_signal(sample: Callable[[list, jax.Array], Experience], records: list,
                       more_records: Callable[[], list], rng, config) -> Experience:
  """DAPO's dynamic sampling: `sample(records, rng)` (sample_and_grade) on the step's prompts,
  and while fewer than `data.prompts_per_step` groups have rewards that differ (a group whose
  rewards are all equal has GRPO advantage 0: no signal), on the next batch of prompts
  (`more_records()`) with a fresh key, at most `rl.filter_max_rounds` rollouts in all. The step
  keeps the first `prompts_per_step` groups with signal, in sampling order; when the rounds run
  out, groups without signal fill it (the step's shapes are fixed). Every process takes the same
  decisions: the rewards are gathered to each."""
  n, want = config.rollout.n, config.data.prompts_per_step
  rounds, signal, spare = [], [], []
  for r in range(config.rl.filter_max_rounds):
    exp = sample(records if r == 0 else more_records(),
                 rng if r == 0 else jax.random.fold_in(rng, r))
    rounds.append(exp)
    s = sharding.to_host(exp.scores).reshape(-1, n)  # [groups, n]
    has = s.max(axis=1) != s.min(axis=1)
    signal += [(r, g) for g in np.flatnonzero(has)]
    spare += [(r, g) for g in np.flatnonzero(~has)]
    if len(signal) >= want:
      break
  offsets = np.cumsum([0] + [len(e.scores) for e in rounds])
  rows = np.concatenate([offsets[r] + g * n + np.arange(n) for r, g in (signal + spare)[:want]])
  picked = _take_rows([(e.rollout, e.scores, e.correct) for e in rounds], rows)
  timing = {k: float(sum(e.timing[k] for e in rounds)) for k in ("rollout", "reward")}
  for k in ("slot_utilization", "retry_frac"):
    timing[k] = float(np.mean([e.timing[k] for e in rounds]))
  timing.update(groups_kept_frac=len(signal) / (want * len(rounds)), filter_rounds=len(rounds),
                groups_without_signal=max(want - len(signal), 0))
  return Experience(*picked, float(np.mean([e.prompt_truncated for e in rounds])), timing)


@jax.jit
def _take_rows(trees: list, rows):
  """The rows `rows` [R] of the rounds' arrays, concatenated (on every process, collectively)."""
  cat = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cat)


@jax.jit
def _rollout_stats(lengths, finish_reason, scores, n_max, correct):
  lengths = lengths.astype(jnp.float32)
  return {
      "rollout/response_length_mean": jnp.mean(lengths),
      "rollout/response_length_max": jnp.max(lengths),
      "rollout/truncated_frac": jnp.mean((finish_reason == sampling.FINISH_LENGTH)
                                         .astype(jnp.float32)),
      "reward/mean": jnp.mean(scores),
      "reward/accuracy": jnp.mean((scores >= correct).astype(jnp.float32)),
  }


def rollout_metrics(rollout, scores, config) -> dict:
  return _rollout_stats(rollout.lengths, rollout.finish_reason, scores,
                        config.rollout.max_new_tokens, config.reward.correct)
