"""The CPU default's "base model": a tiny Qwen2 pre-trained (SFT) on a generated task's traces.

The paper starts RL from a base model that can already solve part of its problems. On a laptop we
make one: a random Qwen2-architecture model with a small tokenizer, trained for `pretrain.steps`
steps of teacher-forced cross-entropy on the task's demonstrations: for `synthetic_arithmetic`
its worked solutions (for a share `pretrain.direct_answer_frac` of the problems, the bare boxed
answer instead); for `countdown` `pretrain.traces_per_problem` random attempts per problem (a
share `data.countdown.retry_frac` of them checking and retrying; see data.countdown). Then saved in
Hugging Face format (config.json, safetensors, tokenizer) with its held-out greedy accuracy in
`pretrain.json`. The directory is keyed by a hash of every setting that shapes it, so a second run
(or another variant of the same experiment) reuses it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import time
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from explore_jax import data as data_lib
from explore_jax import paths
from explore_jax import rewards as rewards_lib
from explore_jax import rollout as rollout_lib
from explore_jax.data import countdown, synthetic, templates
from explore_jax.data import tokenizer as tokenizer_lib
from explore_jax.models import checkpoint, qwen2
from explore_jax.rollout import sampling

FORMAT_VERSION = 2  # bump when the recipe below or the task's text changes: stale bases are not reused


def model_config(config: ml_collections.ConfigDict, vocab_size: int, eos_id: int
                 ) -> qwen2.Qwen2Config:
  m = config.model
  return qwen2.Qwen2Config(
      vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
      num_key_value_heads=m.num_key_value_heads, rope_theta=m.rope_theta,
      tie_word_embeddings=m.tie_word_embeddings, max_position_embeddings=4096,
      bos_token_id=eos_id, eos_token_id=eos_id)


def _key(config: ml_collections.ConfigDict) -> str:
  fields = {"model": config.model.to_dict(), "pretrain": config.pretrain.to_dict(),
            "task": config.data.synthetic.to_dict(),
            "template": config.data.template, "version": FORMAT_VERSION}
  if config.data.name == "countdown":
    fields["task"] = {"countdown": config.data.countdown.to_dict()}
  else:  # arithmetic: the key of the bases built before countdown existed
    for k in ("traces_per_problem", "length_buckets"):
      fields["pretrain"].pop(k, None)
  for k in ("path", "tokenizer", "param_dtype", "dtype", "remat", "attention", "scan_layers",
            "remat_policy"):
    fields["model"].pop(k, None)
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def base_model(config: ml_collections.ConfigDict, root: str | None = None) -> str:
  """Directory of the pre-trained tiny base model for this config; built on first use.

  Published complete or not at all: each caller (every process of a job, whether or not the
  hosts share `root`) builds its own copy in a directory of its own and renames it into place;
  a rename onto a directory another caller published first fails, and theirs is kept (the same
  config and seed build the same model)."""
  path = os.path.join(root or paths.cache_dir("base_models"), _key(config))
  if is_complete(path):
    logging.info("using cached base model %s", path)
    return path
  if os.path.exists(path):  # an older release could publish a directory without weights
    aside = f"{path}.incomplete-{uuid.uuid4().hex[:8]}"
    logging.warning("base model %s is incomplete (no %s); moving it to %s and rebuilding", path,
                    ", ".join(f for f in COMPLETE_FILES if not os.path.exists(
                        os.path.join(path, f))), aside)
    try:
      os.rename(path, aside)
    except FileNotFoundError:
      pass  # another process moved it first
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    build(config, tmp)
    try:
      os.rename(tmp, path)
    except OSError:
      if not is_complete(path):
        raise
      logging.info("base model %s was published by another process; keeping it", path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "pretrain.json")


def is_complete(path: str) -> bool:
  """Whether `path` holds every file a finished `build` writes (pretrain.json is written last)."""
  return all(os.path.exists(os.path.join(path, f)) for f in COMPLETE_FILES)


def _task_configs(config: ml_collections.ConfigDict) -> dict:
  return data_lib.generated_task_configs(config.data.synthetic, config.data.countdown)


def demonstrations(config: ml_collections.ConfigDict) -> tuple[list[dict], list[str]]:
  """(records, completions) the base model is pre-trained on: one worked solution per arithmetic
  problem; `pretrain.traces_per_problem` random attempts per countdown problem, each drawn from
  a generator seeded by the problem and the trace's index (the same at any process count)."""
  if config.data.name not in ("synthetic_arithmetic", "countdown"):
    raise ValueError(f"pretrain: data.name={config.data.name!r}; a base model is built for "
                     "'synthetic_arithmetic' or 'countdown' (set model.path for another task)")
  tasks = _task_configs(config)
  records = data_lib.load(config.data.name, "train", **tasks)
  if config.data.name == "countdown":
    task = tasks["countdown_config"]
    reps = config.pretrain.traces_per_problem
    rngs = (random.Random(f"trace/{task.seed}/{r['problem']}/{i}") for r in records
            for i in range(reps))
    records = [r for r in records for _ in range(reps)]
    return records, [countdown.trace(r, task, rng) for r, rng in zip(records, rngs)]
  frac = config.pretrain.direct_answer_frac
  return records, [synthetic.completion_text(r, frac) for r in records]


def heldout(config: ml_collections.ConfigDict) -> list[dict]:
  """The held-out problems a base model's greedy accuracy is measured on (at most 200)."""
  return data_lib.load(config.data.name, "test", **_task_configs(config))[:200]


def _sequences(records, completions, tokenizer, template: str, seq_len: int, eos_id: int):
  """Right-padded [n, seq_len] tokens, attention mask and loss mask (completion tokens only)."""
  n = len(records)
  tokens = np.full((n, seq_len), eos_id, np.int32)
  attn = np.zeros((n, seq_len), np.int32)
  loss = np.zeros((n, seq_len), np.float32)
  skipped = 0
  prompts = tokenizer([templates.apply_template(template, r["problem"], tokenizer)
                       for r in records], add_special_tokens=False)["input_ids"]
  completions = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
  for i, (prompt, completion) in enumerate(zip(prompts, completions)):
    ids = prompt + completion + [eos_id]
    if len(ids) > seq_len:
      skipped += 1
      continue
    tokens[i, :len(ids)] = ids
    attn[i, :len(ids)] = 1
    loss[i, len(prompt):len(ids)] = 1  # position j is scored on predicting token j
  if skipped:
    logging.warning("pretrain: %d of %d sequences longer than pretrain.seq_len=%d were dropped",
                    skipped, n, seq_len)
  return tokens, attn, loss


def length_buckets(attn: np.ndarray, count: int) -> list[tuple[int, np.ndarray]]:
  """(length, rows) of the batches pre-training draws: every row at the full length, or with
  count = 2 also a short bucket, the smallest multiple of 16 that holds 90% of the rows (most
  countdown traces are a third of the longest), which the rows that fit go to."""
  n, seq_len = attn.shape
  if count == 1:
    return [(seq_len, np.arange(n))]
  if count != 2:
    raise ValueError(f"pretrain.length_buckets={count}: use 1 or 2")
  lengths = attn.sum(axis=1)
  short = min(seq_len, int(-(-np.percentile(lengths, 90) // 16) * 16))
  fits = lengths <= short
  return [(short, np.flatnonzero(fits)), (seq_len, np.flatnonzero(~fits))]


@functools.partial(jax.jit, static_argnames=("cfg", "tx"), donate_argnames=("params", "opt"))
def _sft_step(params, opt, tokens, attn, loss_mask, *, cfg, tx):
  def loss_fn(p):
    logits = qwen2.forward(p, tokens[:, :-1], cfg, attn[:, :-1])  # [B, T-1, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    w = loss_mask[:, 1:]
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt = tx.update(grads, opt, params)
  return optax.apply_updates(params, updates), opt, loss


def greedy_accuracy(cfg, params, tokenizer, records, template: str, eos_id: int, *,
                    max_new_tokens: int = 64, batch: int = 100) -> float:
  """Share of records whose greedy response is graded correct (the template's reward method)."""
  correct = 0
  pool = rewards_lib.RewardPool(timeout_s=5.0)
  for i in range(0, len(records), batch):
    chunk = records[i:i + batch]
    ids = [tokenizer(templates.apply_template(template, r["problem"], tokenizer),
                     add_special_tokens=False)["input_ids"] for r in chunk]
    toks, mask = sampling.left_pad(ids, eos_id)
    out = rollout_lib.generate(cfg, params, toks, mask, jax.random.PRNGKey(0),
                               max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos_id)
    lengths = np.asarray(out.lengths)
    texts = tokenizer.batch_decode([t[:n] for t, n in zip(np.asarray(out.tokens).tolist(),
                                                          lengths.tolist())],
                                   skip_special_tokens=True)
    scores = pool.score(texts, [r["answer"] for r in chunk],
                        method=templates.reward_method(template))
    correct += int(np.sum(scores > 0))
  pool.close()
  return correct / max(len(records), 1)


def build(config: ml_collections.ConfigDict, path: str) -> dict:
  """Tokenizer + random model + SFT, saved to `path` in Hugging Face format."""
  os.makedirs(path, exist_ok=True)
  records, completions = demonstrations(config)
  # The arithmetic tokenizer's merges come from arithmetic alone; another task's add its texts.
  extra = () if config.data.name == "synthetic_arithmetic" else [
      templates.apply_template(config.data.template, r["problem"]) + c
      for r, c in zip(records[:4000], completions[:4000])]
  tokenizer = tokenizer_lib.build_tiny_tokenizer(path, extra_texts=extra)
  eos_id = tokenizer.eos_token_id
  vocab = -(-len(tokenizer) // 64) * 64  # round up: friendlier shapes, as real vocabularies are
  cfg = model_config(config, vocab, eos_id)
  pre = config.pretrain
  params = qwen2.init_params(cfg, jax.random.PRNGKey(pre.seed))
  tokens, attn, loss_mask = _sequences(records, completions, tokenizer, config.data.template,
                                       pre.seq_len, eos_id)
  steps = pre.steps
  schedule = optax.warmup_cosine_decay_schedule(0.0, pre.lr, min(50, steps // 10 + 1),
                                                max(steps, 2), pre.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt = tx.init(params)
  rng = np.random.default_rng(pre.seed)
  buckets = length_buckets(attn, pre.length_buckets)
  share = np.array([len(rows) for _, rows in buckets], np.float64) / len(records)
  t0 = time.perf_counter()
  losses = []
  for step in range(steps):
    if len(buckets) == 1:
      idx, length = rng.integers(0, len(records), pre.batch_size), pre.seq_len
    else:  # a batch of one bucket, the buckets drawn in proportion to their rows
      length, rows = buckets[rng.choice(len(buckets), p=share)]
      idx = rows[rng.integers(0, len(rows), pre.batch_size)]
    params, opt, loss = _sft_step(params, opt, tokens[idx, :length], attn[idx, :length],
                                  loss_mask[idx, :length], cfg=cfg, tx=tx)
    if step % 100 == 0 or step == steps - 1:
      losses.append((step, float(loss)))
      logging.info("pretrain step %d/%d: loss %.4f", step + 1, steps, float(loss))
  train_s = time.perf_counter() - t0
  test = heldout(config)
  # A random model (steps = 0, used by fast tests) is not graded: it solves nothing.
  acc = (greedy_accuracy(cfg, params, tokenizer, test, config.data.template, eos_id,
                         max_new_tokens=max(64, config.rollout.max_new_tokens)) if steps
         else 0.0)
  logging.info("pretrained base model: held-out greedy accuracy %.3f (%d problems)", acc,
               len(test))
  # Not collective: with several processes each builds and writes its own copy (base_model).
  checkpoint.save_hf_local(cfg, params, path)  # the tokenizer is already in `path`
  summary = {"steps": steps, "train_seconds": train_s, "loss_curve": losses,
             "heldout_greedy_accuracy": acc, "heldout_problems": len(test),
             "num_params": int(sum(x.size for x in jax.tree.leaves(params)))}
  with open(os.path.join(path, "pretrain.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
