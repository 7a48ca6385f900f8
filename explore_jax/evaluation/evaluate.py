"""Benchmark evaluation: n samples per problem, avg@n, unbiased pass@k, length and repetition.

Launch (the config file's docstring has the protocol it encodes):

  python -m explore_jax.evaluate --config configs/eval_paper.py --config.model=/ckpt/qwen \
      --workdir /tmp/eval
  # several models, one line each in passk.png:
  python -m explore_jax.evaluate --config configs/eval_paper.py \
      --config.models="('/ckpt/grpo', '/ckpt/grpo_entropy')" --workdir /tmp/eval

For every model and every benchmark in `config.benchmarks`, each problem gets `n` responses sampled
with the config's temperature / top-p / max_new_tokens (`explore_jax.rollout.generate`), graded by
`explore_jax.rewards.score`, and summarised as:

  avg@n            mean over problems of c/n (c = correct responses of the problem)
  pass@k           mean over problems of the unbiased estimator 1 - C(n-c, k) / C(n, k)
                   (Chen et al. 2021) for k = 1, 2, 4, ..., n (and n itself)
  mean_length      mean number of generated tokens per response (the sampler's `lengths`)
  repetition_rate  `repetition_rate` below, averaged over responses: the fraction of a response's
                   token 4-grams that repeat a 4-gram seen earlier in the same response
  truncated_frac   fraction of responses that hit max_new_tokens without an end-of-sequence token

Workdir layout (label: the model directory's basename, made unique):
  config.json                          the resolved config
  results.json                         {"models": {label: {"path", "benchmarks": {name: summary}}}}
  per_problem.csv                      one row per (model, benchmark, problem)
  passk.png                            pass@k curves, one panel per benchmark, a line per model
  <label>/<benchmark>/responses.jsonl  every response with its grade, appended per batch

Devices: `config.mesh` is a (data, fsdp, tensor) mesh over every device, as in the trainer. The
parameters are loaded straight into their shards, and the rows of each generate call are split over
data x fsdp. The default (-1, 1, 1) replicates the parameters; a model too big for one chip needs
`tensor` (e.g. --config.mesh.shape="(-1,1,4)"). On several hosts (`config.distributed`; coordinator
"auto" on a TPU pod, as `launch_tpu.sh evaluate` sets it) every process runs the same command and
samples its share of the rows. Process 0 alone reads and writes the workdir and grades, so the
workdir is a path on its disk. The model directory and the data must be on every host; the hosts
check that their model files and problem lists agree, and an error on process 0 stops them all.

Resume: a problem whose n responses are all in responses.jsonl is not sampled again; a problem
with fewer (an interrupted write) is dropped from the file and sampled again. So a long evaluation
killed and restarted, or one run first with `max_problems` and then without, only does new work.
A response's sampling keys fold in its problem's index and its sample index, so a resumed run
draws what an uninterrupted one would have drawn, whatever the batch boundaries and the engine.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

from explore_jax.models.files import model_fingerprint
from explore_jax.paths import absolute, write_whole

# --------------------------------------------------------------------------------------------------
# Config schema (configs/eval_*.py start from these and override)
# --------------------------------------------------------------------------------------------------


def benchmark(dataset: str, n: int, *, split: str = "test", template: str = "qwen_math",
              reward_method: str = "math_verify", max_problems: int = -1,
              problem_field: str = "problem", answer_field: str = "answer", id_field: str = ""):
  """One entry of `config.benchmarks`: which data, how many samples, how prompts and grades work."""
  import ml_collections
  return ml_collections.ConfigDict(dict(
      # explore_jax.data.load name, JSONL / JSON / parquet file, or hub dataset hf:ORG/NAME
      dataset=dataset,
      split=split,
      # a file's or hub dataset's fields (dotted paths); id_field empty: ids from line numbers
      problem_field=problem_field,
      answer_field=answer_field,
      id_field=id_field,
      n=n,  # responses per problem; pass@k is reported for k = 1, 2, 4, ..., n
      template=template,  # explore_jax.data.templates.apply_template name
      reward_method=reward_method,  # explore_jax.rewards.score method
      max_problems=max_problems,  # > 0: only the first max_problems problems
  ))


# A benchmark's field names at their defaults are left out of responses' sampled_with.json, so
# that records written before the keys existed still resume.
FILE_FIELDS = {"problem_field": "problem", "answer_field": "answer", "id_field": ""}


def base_config():
  """Every key of an evaluation config, with the paper's sampling protocol as defaults."""
  import ml_collections

  from explore_jax.config import defaults
  c = ml_collections.ConfigDict()
  # HF or orbax directory (local or gs://), or a hub id ORG/NAME[@REV] (explore_jax.models.hub)
  c.model = ""
  c.models = ()  # more of them: each gets its own line in passk.png
  c.tokenizer = ""  # directory or hub id; empty: the model's own
  # Comma-separated names of config.benchmarks to run ("math500,aime24"); empty: all of them.
  c.only = ""
  c.dtype = ""  # parameter and compute dtype ("bfloat16"); empty: float32 (HF), as saved (orbax)
  c.data_dir = ""  # empty: $EXPLORE_JAX_DATA, else the package's data files
  c.seed = 0
  c.batch_size = 256  # sequences (prompts x samples) per generate call
  # "continuous": each call decodes through `slots` decode slots, refilled as rows end
  # (explore_jax.rollout.engine); "paged": up to `slots` rows at once over a pool of `kv_pages`
  # KV pages (explore_jax.rollout.paged); "static": all rows of a call until its longest ends.
  c.engine = "continuous"
  c.slots = 0  # continuous, paged: rows decoded at once; 0 = batch_size
  c.chunk = 16  # continuous: decode steps a call's cache read is sized for (rollout.chunk)
  c.kv_block = 64  # continuous: decode attention reads each row's filled blocks of this many slots
  c.refill_share = 0.25  # continuous: a chunk ends early once this share of the slots is free
  # paged: pages in the pool (0: room for every slot's full row), positions per page, pages per
  # block of the Pallas kernels' reads, page attention (rollout.page_attention)
  c.kv_pages = 0
  c.page_size = 16
  c.page_block = 2
  c.page_attention = "auto"
  c.prompt_bucket = 64  # prompts are left-padded to a multiple of this many tokens
  c.save_tokens = True  # keep response token ids in responses.jsonl (for explore_jax.analyze)
  c.reward_timeout_s = 10.0  # per response; past it the grading worker is killed, 'incorrect'
  c.reward_workers = 0  # grading processes; 0: one per CPU
  # Responses already in the workdir that were sampled from other model files or with other
  # settings: "raise", or "set_aside" (moved to responses.stale.jsonl and sampled again).
  c.on_changed_responses = "raise"
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=8192))
  # Difficulty of synthetic_arithmetic (explore_jax.data.synthetic.ArithmeticConfig fields); it
  # must match the training run's `data.synthetic` for its held-out split to be the same task.
  c.synthetic = ml_collections.ConfigDict(dict(
      min_operands=2, max_operands=4, max_number=19, max_value=999, ops="+-*", train_size=20000,
      test_size=500))
  c.countdown = defaults.countdown_config()  # the same, for the countdown task
  c.benchmarks = ml_collections.ConfigDict()
  # Devices, as in the trainer: a (data, fsdp, tensor) mesh over every device of every process.
  # The default puts them all on `data`: parameters replicated, the rows of each generate call
  # split. A model too big for one chip adds `tensor`, e.g. (-1, 1, 4).
  c.mesh = defaults.mesh_config((-1, 1, 1))
  # Several hosts (a TPU pod slice): each runs the same command (coordinator "auto" on a pod) and
  # samples its share of every call; process 0 grades and writes the workdir (a local path).
  c.distributed = defaults.distributed_config()
  return c


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c, k: int):
  """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), vectorised over `c` (scalar or array of ints).

  Computed as -expm1(sum_{i=n-c+1}^{n} log1p(-k/i)): the ratio C(n-c,k)/C(n,k) equals
  prod_{i=n-c+1}^{n} (1 - k/i), and summing logs avoids both the huge binomials of n = 256 and the
  cancellation of 1 - (a number close to 1) when pass@k is small. Where n - c < k every k-subset
  holds a correct sample, so pass@k = 1.
  """
  n, k = int(n), int(k)
  if n < 1 or not 1 <= k <= n:
    raise ValueError(f"pass_at_k: need n >= 1 and 1 <= k <= n, got n={n}, k={k}")
  c_arr = np.asarray(c)
  if not np.issubdtype(c_arr.dtype, np.integer):
    if np.any(c_arr != np.round(c_arr)):
      raise ValueError(f"pass_at_k: c must be integer counts, got {c!r}")
    c_arr = c_arr.astype(np.int64)
  if np.any(c_arr < 0) or np.any(c_arr > n):
    raise ValueError(f"pass_at_k: c must lie in [0, n={n}], got {c!r}")
  i = np.arange(1, n + 1, dtype=np.float64)
  # log(1 - k/i) is only needed for i > k (the terms that enter when n - c >= k).
  terms = np.where(i > k, np.log1p(-k / np.maximum(i, k + 1)), -np.inf)
  # suffix[c] = sum_{i=n-c+1}^{n} terms[i-1]; suffix[0] = 0.
  suffix = np.concatenate([[0.0], np.cumsum(terms[::-1])])
  log_ratio = suffix[c_arr]
  out = np.where(n - c_arr < k, 1.0, -np.expm1(log_ratio)) + 0.0  # + 0.0: no -0.0 in outputs
  return float(out) if out.ndim == 0 else out


def k_values(n: int) -> list[int]:
  """1, 2, 4, ... up to n, and n itself when it is not a power of two."""
  ks = [2**i for i in range(int(math.log2(n)) + 1)]
  return ks if ks[-1] == n else ks + [n]


def repetition_rate(tokens: Sequence[int], ngram: int = 4) -> float:
  """Fraction of the response's n-grams that already occurred earlier in it: 1 - distinct / total.

  0 for a response with no repeated n-gram, -> 1 for a degenerate loop; 0 for responses shorter than
  `ngram` tokens (they hold no n-gram to repeat).
  """
  tokens = list(tokens)
  total = len(tokens) - ngram + 1
  if total <= 0:
    return 0.0
  grams = {tuple(tokens[i:i + ngram]) for i in range(total)}
  return 1.0 - len(grams) / total


def summarize(correct_counts: np.ndarray, n: int, lengths: Iterable[float],
              repetitions: Iterable[float], truncated: Iterable[bool]) -> dict[str, Any]:
  """Benchmark summary from per-problem correct counts and per-response statistics."""
  counts = np.asarray(correct_counts, np.int64)
  return {
      "n": n,
      "num_problems": int(counts.size),
      "avg@n": float(np.mean(counts / n)) if counts.size else float("nan"),
      "pass@k": {str(k): float(np.mean(pass_at_k(n, counts, k))) if counts.size else float("nan")
                 for k in k_values(n)},
      "mean_length": float(np.mean(list(lengths))) if counts.size else float("nan"),
      "repetition_rate": float(np.mean(list(repetitions))) if counts.size else float("nan"),
      "truncated_frac": float(np.mean(list(truncated))) if counts.size else float("nan"),
  }


# --------------------------------------------------------------------------------------------------
# Responses file (the resume record)
# --------------------------------------------------------------------------------------------------


def load_graded(path: str, n: int) -> dict[str, list[dict]]:
  """Problem id -> its n graded records; drops (and rewrites away) incomplete problems."""
  if not os.path.exists(path):
    return {}
  by_problem: dict[str, list[dict]] = {}
  dirty = False
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        dirty = True  # a line cut by a kill mid-write: its problem is resampled
        continue
      by_problem.setdefault(str(rec["problem_id"]), []).append(rec)
  complete = {pid: recs for pid, recs in by_problem.items() if len(recs) == n}
  if dirty or len(complete) != len(by_problem):
    if any(len(recs) > n for recs in by_problem.values()):
      raise ValueError(f"{path}: a problem has more than n={n} responses; was n changed? "
                       "Use a fresh workdir.")
    write_whole(path, "".join(json.dumps(r) + "\n" for recs in complete.values() for r in recs))
  return complete


def check_sampled_with(out_dir: str, sampled_with: dict, on_change: str = "raise") -> None:
  """Responses in out_dir are resumed only if they were sampled the same way from the same model
  files: out_dir/sampled_with.json records how (the number of problems may grow). On a change,
  `on_change` = "raise" stops naming what changed; "set_aside" moves the old responses to
  responses.stale.jsonl so that they are sampled again."""
  if on_change not in ("raise", "set_aside"):
    raise ValueError(f"on_changed_responses={on_change!r}: use 'raise' or 'set_aside'")
  path = os.path.join(out_dir, "sampled_with.json")
  responses = os.path.join(out_dir, "responses.jsonl")
  if os.path.exists(responses) and os.path.getsize(responses):
    if not os.path.exists(path):
      print(f"[evaluate] {responses} has no record of how it was sampled (written before "
            "explore_jax kept one): resuming it as if sampled with the current settings",
            flush=True)
    else:
      with open(path) as f:
        try:
          before = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: not valid JSON ({e}); delete {out_dir} to re-evaluate") from e
      changed = sorted(k for k in set(before) | set(sampled_with)
                       if before.get(k) != sampled_with.get(k))
      if changed:
        diff = "; ".join(f"{k}: {before.get(k)} -> {sampled_with.get(k)}" for k in changed)
        if on_change == "raise":
          raise ValueError(f"{responses} was sampled differently ({diff}): delete {out_dir} to "
                           "re-evaluate, evaluate into a fresh workdir, or set "
                           "on_changed_responses='set_aside'.")
        stale = os.path.join(out_dir, "responses.stale.jsonl")
        os.replace(responses, stale)
        print(f"[evaluate] {responses} was sampled differently ({diff}): moved to {stale}, "
              "sampling again", flush=True)
  write_whole(path, json.dumps(sampled_with, indent=2))


def append_records(path: str, records: list[dict]) -> None:
  with open(path, "a") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# Sampling and grading
# --------------------------------------------------------------------------------------------------


def sample(model_config, params, tokenizer, prompts: list[str], n: int, config, rng, eos_id: int,
           mesh, prompt_index: Sequence[int] | None = None) -> list[list[tuple[list[int], int]]]:
  """n (token ids, length) responses for each prompt of one batch, on every process.

  Every generate call has the same shape (prompts_per_call x n_call rows, bucketed prompt width):
  a short last batch is filled with copies of its last prompt and the surplus rows are dropped, so
  the sampler compiles once per prompt-width bucket instead of once per odd batch. The prompts are
  replicated over the mesh; the sampler splits the rows over its data axes.
  """
  import jax
  from explore_jax import rollout as rollout_lib
  from explore_jax.rollout import sampling
  from explore_jax.tpu import sharding

  continuous = config.engine in ("continuous", "paged")
  # The engine bounds memory by its slots: a call takes all n samples of its prompts.
  n_call = n if continuous else min(n, config.batch_size)  # samples per prompt per call
  per_call = max(1, config.batch_size // n)
  index = list(range(len(prompts)) if prompt_index is None else prompt_index)
  index += [index[-1]] * (per_call - len(index))
  # No special tokens: a chat template already writes its own (as the trainer encodes prompts).
  prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
  prompt_ids += [prompt_ids[-1]] * (per_call - len(prompt_ids))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  # Width rounded up to a multiple of prompt_bucket: fewer distinct shapes, fewer recompiles.
  bucket = config.prompt_bucket
  tokens, mask = sampling.left_pad(prompt_ids, pad_id,
                                   -(-max(len(s) for s in prompt_ids) // bucket) * bucket)
  put = lambda x: jax.make_array_from_callback(x.shape, sharding.replicated(mesh),
                                               lambda idx: x[idx])
  per_prompt: list[list[tuple]] = [[] for _ in prompts]
  for chunk in range(-(-n // n_call)):
    start = time.perf_counter()
    out, stats = rollout_lib.generate(
        model_config, params, put(tokens), put(mask), rng,
        max_new_tokens=config.sampling.max_new_tokens, temperature=config.sampling.temperature,
        top_p=config.sampling.top_p, top_k=config.sampling.top_k, eos_id=eos_id, n=n_call,
        mesh=mesh, prompt_index=np.asarray(index), sample_offset=chunk * n_call,
        engine=config.engine, slots=config.slots or config.batch_size, chunk=config.chunk,
        kv_block=config.kv_block, refill_share=config.refill_share, kv_pages=config.kv_pages,
        page_size=config.page_size, page_block=config.page_block,
        page_attention=config.page_attention, with_stats=True)
    out_tokens, out_mask, out_len = (sharding.to_host(x) for x in (out.tokens, out.mask,
                                                                   out.lengths))
    seconds = time.perf_counter() - start
    if jax.process_index() == 0:
      print(f"[evaluate] {int(out_len.sum())} tokens in {seconds:.1f} s "
            f"({out_len.sum() / max(seconds, 1e-9):.0f} tokens/s, {config.engine} engine, "
            f"slot utilization {float(stats['slot_utilization']):.2f})", flush=True)
    for row in range(out_tokens.shape[0]):
      i = row // n_call
      if i < len(prompts) and len(per_prompt[i]) < n:
        generated = out_tokens[row][out_mask[row].astype(bool)].tolist()
        per_prompt[i].append((generated, int(out_len[row])))
  return per_prompt


def grade(tokenizer, problems: list[dict], prompts: list[str], samples: list[list[tuple]],
          config, name: str, bench, eos_id: int, pool) -> list[dict]:
  """The records of `sample`'s responses, graded; ordered by problem, then sample."""
  texts, answers, records = [], [], []
  for prob, prompt, responses in zip(problems, prompts, samples):
    for s, (generated, length) in enumerate(responses):
      finished = eos_id in generated
      body = generated[:generated.index(eos_id)] if finished else generated
      text = tokenizer.decode(body, skip_special_tokens=True)
      texts.append(text)
      answers.append(str(prob["answer"]))
      records.append({
          "benchmark": name, "problem_id": str(prob["id"]), "sample": s,
          "prompt": prompt, "response": text, "answer": str(prob["answer"]),
          "length": length, "finished": finished, "repetition": repetition_rate(body),
          "tokens": generated if config.save_tokens else None})
  scores = np.asarray(pool.score(texts, answers, method=bench.reward_method), np.float64)
  for rec, score in zip(records, scores):
    rec["reward"] = float(score)
    rec["correct"] = bool(score > 0)
  return records


def evaluate_benchmark(model_config, params, tokenizer, name: str, bench, config, out_dir: str,
                       eos_id: int, pool, sampled_with: dict, mesh
                       ) -> tuple[dict, list[dict]] | None:
  """Sample/grade what is not yet in out_dir/responses.jsonl; return (summary, per-problem rows).
  `sampled_with` identifies the model and sampling settings (see check_sampled_with). Every
  process samples; process 0 reads and writes out_dir, grades (with `pool`) and returns the
  result, the others return None."""
  import jax
  from explore_jax import data
  from explore_jax.data import templates
  from explore_jax.tpu import sharding

  path = os.path.join(out_dir, "responses.jsonl")
  problems = list(data.load(bench.dataset, bench.split, data_dir=config.data_dir or None,
                            **data.generated_task_configs(config.synthetic, config.countdown),
                            **data.file_fields(bench)))
  if bench.max_problems > 0:
    problems = problems[:bench.max_problems]
  ids = [str(p["id"]) for p in problems]
  sharding.check_same_on_every_host(f"evaluate: the problems of {name} ({bench.dataset})",
                                    json.dumps(problems, sort_keys=True, default=str))

  def read_done():
    os.makedirs(out_dir, exist_ok=True)
    check_sampled_with(out_dir, sampled_with, config.on_changed_responses)
    return load_graded(path, bench.n)

  done = sharding.on_main(read_done, f"evaluate: reading {path}") or {}
  # What is left to sample, as process 0 (the one holding responses.jsonl) sees it.
  left = sharding.from_main(np.array([pid not in done for pid in ids], np.int32))
  todo = [(i, p) for i, p in enumerate(problems) if left[i]]
  per_call = max(1, config.batch_size // bench.n)
  base_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                zlib.crc32(name.encode()) & 0x7FFFFFFF)
  for start in range(0, len(todo), per_call):
    batch = todo[start:start + per_call]
    probs = [p for _, p in batch]
    prompts = [templates.apply_template(bench.template, p["problem"], tokenizer=tokenizer)
               for p in probs]
    # The problems' indices in the full list key their draws: a resumed run draws the same.
    samples = sample(model_config, params, tokenizer, prompts, bench.n, config, base_rng, eos_id,
                     mesh, prompt_index=[i for i, _ in batch])

    def save():
      records = grade(tokenizer, probs, prompts, samples, config, name, bench, eos_id, pool)
      append_records(path, records)
      for rec in records:
        done.setdefault(rec["problem_id"], []).append(rec)
      print(f"[evaluate] {name}: {min(start + per_call, len(todo))}/{len(todo)} problems "
            f"sampled ({len(problems) - len(todo)} resumed)", flush=True)

    sharding.on_main(save, f"evaluate: grading {name}")
  if jax.process_index() != 0:
    return None

  counts = np.array([sum(r["correct"] for r in done[pid]) for pid in ids], np.int64)
  recs = [r for pid in ids for r in done[pid]]
  summary = summarize(counts, bench.n, [r["length"] for r in recs], [r["repetition"] for r in recs],
                      [not r["finished"] for r in recs])
  rows = []
  for pid, c in zip(ids, counts):
    row = {"problem_id": pid, "n": bench.n, "num_correct": int(c), "avg@n": c / bench.n}
    row.update({f"pass@{k}": float(pass_at_k(bench.n, int(c), k)) for k in k_values(bench.n)})
    row["mean_length"] = float(np.mean([r["length"] for r in done[pid]]))
    row["repetition_rate"] = float(np.mean([r["repetition"] for r in done[pid]]))
    rows.append(row)
  return summary, rows


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def model_paths(config) -> list[str]:
  """config.model and config.models as given: local or gs:// directories, or hub ids."""
  from explore_jax import paths as paths_lib
  paths = ([config.model] if config.model else []) + list(config.models)
  if not paths:
    raise ValueError("no model to evaluate: set --config.model=DIR or --config.models=(DIR, ...)")
  for p in paths:
    location = paths_lib.locate(p)
    if location.kind == "local" and not os.path.isdir(location.path):
      raise FileNotFoundError(f"config.model(s): {p!r} is not a directory (nor a hub id "
                              "ORG/NAME[@REV])")
  return paths


def selected_benchmarks(config) -> list[str]:
  """The names of config.benchmarks to run: all, or those `config.only` lists, in its order."""
  from explore_jax.config.cli import BadValue
  names = list(config.benchmarks)
  if not names:
    raise ValueError("config.benchmarks is empty: add evaluate.benchmark(...) entries")
  wanted = [n.strip() for n in config.only.split(",") if n.strip()]
  unknown = [n for n in wanted if n not in names]
  if unknown:
    raise BadValue(f"config.only={config.only!r}: {unknown} not in config.benchmarks "
                   f"({', '.join(names)})")
  return wanted or names


def _labels(paths: list[str]) -> list[str]:
  labels = []
  for p in paths:
    base = os.path.basename(os.path.normpath(p)) or "model"
    labels.append(base if base not in labels else f"{base}_{len(labels)}")
  return labels


def _param_shardings(mesh, rules):
  """model config -> the NamedShardings of its parameters (for checkpoint.load_model)."""
  from explore_jax.models import qwen2
  from explore_jax.tpu import sharding

  return lambda model_config: sharding.logical_to_mesh(
      qwen2.logical_axes(model_config), qwen2.param_shapes(model_config), mesh, rules)


def run(config, workdir: str) -> dict | None:
  """Evaluate every model on every benchmark of `config`; write the workdir files; return them.
  With several processes, process 0 writes and returns the results, the others return None."""
  import flax.linen as nn
  import jax
  from explore_jax import paths as paths_lib
  from explore_jax import provenance, rewards
  from explore_jax.config import check
  from explore_jax.data import tokenizer as tokenizer_lib
  from explore_jax.evaluation import plots
  from explore_jax.models import checkpoint
  from explore_jax.models import files as model_files
  from explore_jax.tpu import sharding

  check.check_eval_config(config)  # before anything is written or loaded
  workdir = absolute(workdir)
  config = config.copy_and_resolve_references()
  config.data_dir = absolute(config.data_dir)
  sharding.initialize_distributed(config.distributed)
  is_main = jax.process_index() == 0
  paths = model_paths(config)
  names = selected_benchmarks(config)

  def write_config():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    provenance.note_start(workdir)  # the commit and versions this evaluation ran with

  sharding.on_main(write_config, f"evaluate: writing {workdir}")
  mesh = sharding.make_mesh(config.mesh.shape, what="--config.mesh.shape")
  rules = sharding.with_default_rules(config.mesh.rules)
  results: dict[str, Any] = {"models": {}}
  csv_rows = []
  # One grading pool for the whole run: its workers import math-verify once.
  pool = rewards.RewardPool(max_workers=config.reward_workers or None,
                            timeout_s=config.reward_timeout_s) if is_main else None
  # Each host fetches (a hub id) or stages (gs://) its own copy; the check below compares them.
  tokenizer_dir = (model_files.local_dir(config.tokenizer, "config.tokenizer", kind="tokenizer")
                   if config.tokenizer else "")
  for label, path in zip(_labels(paths), paths):
    local = model_files.local_dir(path, "config.model")
    checkpoint.check_tokenizer_dir(tokenizer_dir or local,
                                   "config.tokenizer" if tokenizer_dir else "config.model")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      model_config, params = checkpoint.load_model(local, dtype=config.dtype or None,
                                                   shardings=_param_shardings(mesh, rules))
      tokenizer = tokenizer_lib.load(tokenizer_dir or local)
      eos_id = tokenizer.eos_token_id
      if eos_id is None:
        eos_id = model_config.eos_token_id
      source = local if paths_lib.locate(path).kind == "local" else path
      entry = results["models"][label] = {"path": source, "benchmarks": {}}
      fingerprint = model_fingerprint(local)
      sharding.check_same_on_every_host(f"evaluate: the model files of {path}", fingerprint)
      if config.tokenizer:
        sharding.check_same_on_every_host(f"evaluate: the tokenizer files of {config.tokenizer}",
                                          model_fingerprint(tokenizer_dir))
      for name in names:
        bench = config.benchmarks[name]
        how = {"model_files": fingerprint,
               "benchmark": {k: v for k, v in bench.to_dict().items() if k != "max_problems"
                             and (k not in FILE_FIELDS or v != FILE_FIELDS[k])},
               "sampling": config.sampling.to_dict(), "seed": config.seed, "dtype": config.dtype,
               "tokenizer": config.tokenizer, "synthetic": config.synthetic.to_dict()}
        if bench.dataset == "countdown":  # (a key of its own: older records stay valid)
          how["countdown"] = config.countdown.to_dict()
        out = evaluate_benchmark(model_config, params, tokenizer, name, bench, config,
                                 os.path.join(workdir, label, name), eos_id, pool, how, mesh)
        if out is None:
          continue
        summary, rows = out
        entry["benchmarks"][name] = summary
        csv_rows += [{"model": label, "benchmark": name, **r} for r in rows]
        print(f"[evaluate] {label} {name}: avg@{bench.n}={summary['avg@n']:.4f} "
              f"pass@{bench.n}={summary['pass@k'][str(bench.n)]:.4f}", flush=True)
    del params
  if not is_main:
    return None
  pool.close()

  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  fields: list[str] = []
  for row in csv_rows:
    fields += [k for k in row if k not in fields]
  with open(os.path.join(workdir, "per_problem.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(csv_rows)
  curves = {label: {b: {int(k): v for k, v in s["pass@k"].items()}
                    for b, s in entry["benchmarks"].items()}
            for label, entry in results["models"].items()}
  plots.plot_pass_at_k(curves, os.path.join(workdir, "passk.png"))
  return results
