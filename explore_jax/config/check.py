"""The config check: every setting's type, range and relations, refused before any work.

A bad setting used to surface late (a ZeroDivisionError naming no key after the first rollout, a
reshape error inside the update) or never (`keep_checkpoints=0` deleted every checkpoint, an
infinite learning rate trained NaN weights). `check_train_config` runs first thing in the
trainer (and its dry run), before a workdir is created or the model or data loads;
`check_eval_config` does the same for the evaluator. Each raises one ValueError listing every
refused setting, one line each: the key, its value, and what is allowed.

The rules are a table (`TRAIN_RULES`, `EVAL_RULES`: key pattern -> Rule) plus relations between
keys (`TRAIN_RELATIONS`), so a new key gets its rule in one line. A key no rule names passes.
Patterns may hold `*` (`benchmarks.*.n`). Checks that need the mesh (the micro-batch's split over
batch shards, `train.setup.step_config`) or the data and tokenizer (`check_prompt_lengths`, run
once both are loaded and before the first rollout) come later, still before any step.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from typing import Any, Callable

import ml_collections
import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4e38: a larger learning rate is inf on device
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Rule:
  """`ok(value)` decides; `allowed` says what passes, in the error's words."""
  ok: Callable[[Any], bool]
  allowed: str


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def integer(low: int | None = None, high: int | None = None) -> Rule:
  bounds = (f" >= {low}" if high is None else f" in [{low}, {high}]") if low is not None else ""
  return Rule(lambda v: _is_int(v) and (low is None or v >= low) and (high is None or v <= high),
              f"an integer{bounds}")


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Rule:
  """A finite number in a range (finite in float32: the device's precision)."""

  def ok(v):
    if not _is_num(v) or not math.isfinite(v) or abs(v) >= FLOAT32_MAX:
      return False
    if low is not None and (v <= low if low_open else v < low):
      return False
    return high is None or (v < high if high_open else v <= high)

  if low is not None and high is not None:
    where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  elif low is not None:
    where = f" {'>' if low_open else '>='} {low:g}"
  else:
    where = f" {'<' if high_open else '<='} {high:g}" if high is not None else ""
  return Rule(ok, f"a finite number{where}")


def positive_rate() -> Rule:
  """A learning rate: > 0 and finite in float32 (1e39 is inf on the device: NaN weights)."""
  return Rule(lambda v: _is_num(v) and math.isfinite(v) and 0 < v < FLOAT32_MAX,
              f"a number > 0 and below {FLOAT32_MAX:.3g} (finite in float32)")


def one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def text() -> Rule:
  return Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")


def boolean() -> Rule:
  return Rule(lambda v: isinstance(v, (bool, np.bool_)), "True or False")


def mesh_shape() -> Rule:
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_int(x) for x in v)
            and all(x >= 1 or x == -1 for x in v) and sum(x == -1 for x in v) <= 1)
  return Rule(ok, "3 integers (data, fsdp, tensor), each >= 1, or one of them -1 (the rest)")


def _data_name(v) -> bool:
  from explore_jax.data import NAMES  # pylint: disable=g-import-not-at-top
  # A bare name must be a known dataset; a path or hub id is the reader's to resolve.
  return isinstance(v, str) and (v in NAMES or "/" in v or "." in v)


def _template(v) -> bool:
  from explore_jax.data import templates  # pylint: disable=g-import-not-at-top
  if not isinstance(v, str):
    return False
  inner = v[len("chat:"):] if v.startswith("chat:") else v
  return v == "chat" or inner in templates.NAMES and inner != "chat"


def _methods() -> tuple[str, ...]:
  from explore_jax import rewards  # pylint: disable=g-import-not-at-top
  return rewards.METHODS


def _losses():
  from explore_jax.rl import losses  # pylint: disable=g-import-not-at-top
  return losses


def _chips() -> tuple[str, ...]:
  from explore_jax.tpu import memory  # pylint: disable=g-import-not-at-top
  return tuple(memory.HBM_BYTES)


def _lazy_one_of(choices: Callable[[], tuple], what: str) -> Rule:
  """one_of over a list another module owns (read when a config is checked)."""
  return Rule(lambda v: v in choices(), what)


def _kernels() -> tuple:
  from explore_jax.models import paged_attention
  return ("auto", *paged_attention.KERNELS)


# The paged engine's keys (the trainer's rollout section, the evaluator's top level).
PAGED = {
    "kv_pages": integer(0),
    "page_size": integer(1),
    "page_block": integer(1),
    "page_attention": _lazy_one_of(_kernels, "one of 'auto', 'gather', 'native_cpu', "
                                   "'pallas_tpu', 'pallas_gpu'"),
}


SAMPLING = {
    "temperature": number(0.0),
    "top_p": number(0.0, 1.0, low_open=True),
    "top_k": integer(0),
    "max_new_tokens": integer(1),
}

TRAIN_RULES: dict[str, Rule] = {
    "seed": integer(0),
    "total_steps": integer(1),
    "checkpoint_every": integer(1),
    "checkpoint_every_minutes": number(0.0),
    "keep_checkpoints": integer(1),
    "log_every": integer(1),
    "on_nonfinite": one_of("raise", "skip"),
    "dry_run": boolean(),
    "dry_run_chip": Rule(lambda v: v == "" or v in _chips(),
                         "'' or a chip of explore_jax.tpu.memory.HBM_BYTES (v4, v5e, v5p, v6e)"),
    "progress_bar": boolean(),
    "export_hf": boolean(),
    "model.param_dtype": one_of(*DTYPES),
    "model.dtype": one_of(*DTYPES),
    "model.remat": boolean(),
    "model.attention": one_of("auto", "dense", "blockwise", "splash", "cudnn"),
    "model.scan_layers": boolean(),
    "model.remat_policy": one_of("", "none", "full", "projections"),
    "model.hidden_size": integer(1),
    "model.intermediate_size": integer(1),
    "model.num_hidden_layers": integer(1),
    "model.num_attention_heads": integer(1),
    "model.num_key_value_heads": integer(1),
    "model.rope_theta": number(0.0, low_open=True),
    "model.tie_word_embeddings": boolean(),
    "pretrain.steps": integer(0),
    "pretrain.batch_size": integer(1),
    "pretrain.lr": positive_rate(),
    "pretrain.seq_len": integer(2),
    "pretrain.seed": integer(0),
    "pretrain.direct_answer_frac": number(0.0, 1.0),
    "pretrain.traces_per_problem": integer(1),
    "pretrain.length_buckets": integer(1),
    "data.name": Rule(_data_name, "a dataset of explore_jax.data.NAMES, or a file path"),
    "data.split": text(),
    "data.template": Rule(_template, "a template of explore_jax.data.templates.NAMES, or "
                          "chat:NAME"),
    "data.prompts_per_step": integer(1),
    "data.max_prompt_len": integer(1),
    **{f"rollout.{k}": rule for k, rule in SAMPLING.items()},
    "rollout.n": integer(1),
    "rollout.prompts_per_wave": integer(0),
    "rollout.engine": one_of("continuous", "static", "paged"),
    "rollout.slots": integer(0),
    "rollout.chunk": integer(1),
    "rollout.kv_block": integer(0),
    "rollout.refill_share": number(0.0, 1.0, low_open=True),
    **{f"rollout.{k}": rule for k, rule in PAGED.items()},
    "reward.method": _lazy_one_of(_methods, "one of 'math_verify', 'dapo', 'countdown' "
                                  "(explore_jax.rewards.METHODS)"),
    "reward.correct": number(),
    "reward.incorrect": number(),
    "reward.timeout_s": number(0.0, low_open=True),
    "reward.workers": integer(0),
    "rl.algorithm": one_of("grpo", "ppo"),
    "rl.entropy_advantage": boolean(),
    "rl.alpha": number(0.0),
    "rl.kappa": number(0.0, low_open=True),
    "rl.entropy_clip": boolean(),
    "rl.entropy_coef": number(),
    "rl.kl_coef": number(0.0),
    "rl.kl_kind": _lazy_one_of(lambda: _losses().KL_KINDS, "one of 'k1', 'k2', 'k3'"),
    "rl.clip_low": number(0.0, 1.0),  # 1: no lower clip (Clip-Cov's recipe)
    "rl.clip_high": number(0.0),
    "rl.clip_c": Rule(lambda v: _is_num(v) and (v == 0 or 1 < v < FLOAT32_MAX),
                      "0 (off) or a finite number > 1"),
    "rl.agg": _lazy_one_of(lambda: _losses().AGG_MODES, "one of 'token-mean', "
                           "'seq-mean-token-mean', 'seq-mean-token-sum'"),
    "rl.norm_by_std": boolean(),
    "rl.gamma": number(0.0, 1.0),
    "rl.lam": number(0.0, 1.0),
    "rl.whiten_advantages": boolean(),
    "rl.value_clip": number(0.0, low_open=True),
    "rl.epochs": integer(1),
    "rl.mini_batch_size": integer(1),
    "rl.micro_batch_size": integer(0),
    "rl.micro_batch_per_shard": integer(0),
    "rl.critic_warmup_steps": integer(0),
    "rl.logit_chunk": integer(1),
    "rl.length_buckets": integer(1),
    # The exploration suite (docs/exploration_suite.md).
    "rl.policy_loss": one_of("ppo", "clip_cov", "kl_cov"),
    "rl.clip_cov_ratio": number(0.0, 1.0, low_open=True),
    "rl.clip_cov_lb": number(),
    "rl.clip_cov_ub": number(),
    "rl.kl_cov_ratio": number(0.0, 1.0, low_open=True),
    "rl.kl_cov_coef": number(0.0),
    "rl.top_entropy_fraction": number(0.0, 1.0),
    "rl.token_stats": one_of("current", "old"),
    "rl.passk": boolean(),
    "rl.passk_k": integer(1),
    "rl.tis_cap": number(0.0),
    "rl.tis_mode": _lazy_one_of(lambda: _losses().TIS_MODES, "one of 'token', 'sequence', "
                                "'token_mask'"),
    "rl.filter_groups": boolean(),
    "rl.filter_max_rounds": integer(1),
    "reward.overlong_buffer": integer(0),
    "reward.overlong_penalty": number(0.0),
    "export_dtype": one_of("", *DTYPES),
    "data.problem_field": text(),
    "data.answer_field": text(),
    "data.id_field": Rule(lambda v: isinstance(v, str), "a string ('' : none)"),
    "optim.lr": positive_rate(),
    "optim.critic_lr": positive_rate(),
    "optim.warmup_steps": integer(0),
    "optim.schedule": one_of("constant", "cosine"),
    "optim.weight_decay": number(0.0),
    "optim.b1": number(0.0, 1.0, high_open=True),
    "optim.b2": number(0.0, 1.0, high_open=True),
    "optim.eps": number(0.0, low_open=True),
    "optim.max_grad_norm": number(0.0, low_open=True),
    "mesh.shape": mesh_shape(),
    "distributed.num_processes": integer(1),
    "distributed.process_id": integer(0),
    "distributed.cpu_collectives": one_of("", "gloo", "mpi"),
}


def _get(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def _rows(c) -> int:
  return c.data.prompts_per_step * c.rollout.n


def _generated(section: str) -> Callable[[Any], str | None]:
  """The generated task's own config (`data.synthetic` / `data.countdown`) validates itself."""

  def check(c):
    from explore_jax.data import countdown, synthetic  # pylint: disable=g-import-not-at-top
    cls = synthetic.ArithmeticConfig if section.endswith("synthetic") else countdown.CountdownConfig
    try:
      cls(**_get(c, section).to_dict())
    except (TypeError, ValueError) as e:
      return f"{section}={_get(c, section).to_dict()}: {e}"
    return None

  return check


# (keys it reads, check(config) -> a problem naming the keys, or None). Run only when every key
# it reads passed its own rule.
Relation = tuple[tuple[str, ...], Callable[[Any], "str | None"]]

TRAIN_RELATIONS: list[Relation] = [
    (("data.prompts_per_step", "rollout.n", "rl.mini_batch_size"), lambda c: None if
     _rows(c) % c.rl.mini_batch_size == 0 else
     f"rl.mini_batch_size={c.rl.mini_batch_size}: must divide the rollout's rows "
     f"(data.prompts_per_step={c.data.prompts_per_step} x rollout.n={c.rollout.n} = {_rows(c)})"),
    (("rl.mini_batch_size", "rl.micro_batch_size"), lambda c: None if
     c.rl.micro_batch_size == 0 or c.rl.mini_batch_size % c.rl.micro_batch_size == 0 else
     f"rl.micro_batch_size={c.rl.micro_batch_size}: must divide rl.mini_batch_size="
     f"{c.rl.mini_batch_size}"),
    (("rl.micro_batch_size", "rl.micro_batch_per_shard"), lambda c: None if
     (c.rl.micro_batch_size > 0) != (c.rl.micro_batch_per_shard > 0) else
     f"rl.micro_batch_size={c.rl.micro_batch_size}, rl.micro_batch_per_shard="
     f"{c.rl.micro_batch_per_shard}: set exactly one of them (> 0), the other 0"),
    (("rl.algorithm", "rollout.n"), lambda c: None if c.rl.algorithm != "grpo" or
     c.rollout.n >= 2 else
     f"rollout.n={c.rollout.n}: GRPO compares a prompt's samples with each other; must be >= 2"),
    (("reward.correct", "reward.incorrect"), lambda c: None if
     c.reward.correct > c.reward.incorrect else
     f"reward.correct={c.reward.correct}: must be above reward.incorrect="
     f"{c.reward.incorrect}"),
    # Only the static engine samples in waves; the others take a step's prompts in one call.
    (("rollout.prompts_per_wave", "data.prompts_per_step", "rollout.engine"), lambda c: None if
     c.rollout.engine != "static" or c.rollout.prompts_per_wave == 0
     or c.data.prompts_per_step % c.rollout.prompts_per_wave == 0
     else f"rollout.prompts_per_wave={c.rollout.prompts_per_wave}: must divide "
     f"data.prompts_per_step={c.data.prompts_per_step} (or be 0: all of a step)"),
    (("distributed.process_id", "distributed.num_processes"), lambda c: None if
     c.distributed.process_id < c.distributed.num_processes else
     f"distributed.process_id={c.distributed.process_id}: must be below "
     f"distributed.num_processes={c.distributed.num_processes}"),
    (("model.path", "data.name"), lambda c: None if c.model.path or c.data.name in
     ("synthetic_arithmetic", "countdown") else
     f"data.name={c.data.name!r}: with model.path='' (the tiny base model, pre-trained here) "
     "must be 'synthetic_arithmetic' or 'countdown'; set model.path for other data"),
    (("data.synthetic",), _generated("data.synthetic")),
    (("data.countdown",), _generated("data.countdown")),
    (("rl.clip_cov_lb", "rl.clip_cov_ub"), lambda c: None if
     c.rl.clip_cov_lb < c.rl.clip_cov_ub else
     f"rl.clip_cov_lb={c.rl.clip_cov_lb}: must be below rl.clip_cov_ub={c.rl.clip_cov_ub}"),
    (("rl.passk", "rl.passk_k", "rl.algorithm", "rollout.n"), lambda c: None if
     not c.rl.passk or (c.rl.algorithm == "grpo" and c.rl.passk_k <= c.rollout.n) else
     f"rl.passk_k={c.rl.passk_k} with rl.algorithm={c.rl.algorithm!r}: the pass@k advantage "
     f"needs GRPO's groups and k <= rollout.n={c.rollout.n}"),
    (("rl.tis_cap", "rl.tis_mode"), lambda c: None if
     not c.rl.tis_cap or c.rl.tis_mode != "token_mask" or c.rl.tis_cap >= 1 else
     f"rl.tis_cap={c.rl.tis_cap}: token_mask keeps weights in [1/cap, cap], so cap >= 1"),
    (("reward.overlong_buffer", "rollout.max_new_tokens"), lambda c: None if
     c.reward.overlong_buffer <= c.rollout.max_new_tokens else
     f"reward.overlong_buffer={c.reward.overlong_buffer}: tokens in [0, rollout.max_new_tokens="
     f"{c.rollout.max_new_tokens}] (0: off)"),
]


def _leaves(config, prefix: str = "") -> dict[str, Any]:
  """Dotted key -> value for every leaf (tuples are leaves)."""
  out = {}
  for k, v in config.items():
    key = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(_leaves(v, key + "."))
    else:
      out[key] = v
  return out


def problems(config, rules: dict[str, Rule], relations: list[Relation] = ()) -> list[str]:
  """Every refused setting of `config`, one line each ("key=value: must be ...")."""
  leaves = _leaves(config)
  out, bad = [], set()
  for key, value in leaves.items():
    for pattern, rule in rules.items():
      if fnmatch.fnmatchcase(key, pattern) and not rule.ok(value):
        out.append(f"{key}={value!r}: must be {rule.allowed}")
        bad.add(key)
        break
  for keys, relation in relations:
    if any(k in bad or (k not in leaves and not _is_section(config, k)) for k in keys):
      continue
    problem = relation(config)
    if problem:
      out.append(problem)
  return out


def _is_section(config, key: str) -> bool:
  try:
    return isinstance(_get(config, key), ml_collections.ConfigDict)
  except (KeyError, AttributeError):
    return False


def raise_if_bad(what: str, found: list[str]) -> None:
  if found:
    raise ValueError(f"{what}: {len(found)} setting{'s' if len(found) > 1 else ''} refused "
                     "before any work:\n  " + "\n  ".join(found))


def check_train_config(config: ml_collections.ConfigDict) -> None:
  """Raise one ValueError naming every refused setting of a trainer config (module docstring)."""
  raise_if_bad("config", problems(config, TRAIN_RULES, TRAIN_RELATIONS))


EVAL_RULES: dict[str, Rule] = {
    "dtype": one_of("", *DTYPES),
    "seed": integer(0),
    "batch_size": integer(1),
    "engine": one_of("continuous", "static", "paged"),
    **PAGED,
    "slots": integer(0),
    "chunk": integer(1),
    "kv_block": integer(0),
    "refill_share": number(0.0, 1.0, low_open=True),
    "prompt_bucket": integer(1),
    "save_tokens": boolean(),
    "reward_timeout_s": number(0.0, low_open=True),
    "reward_workers": integer(0),
    "on_changed_responses": one_of("raise", "set_aside"),
    "only": Rule(lambda v: isinstance(v, str), "benchmark names separated by commas ('': all)"),
    **{f"sampling.{k}": rule for k, rule in SAMPLING.items()},
    "benchmarks.*.dataset": text(),
    "benchmarks.*.split": text(),
    "benchmarks.*.n": integer(1),
    "benchmarks.*.template": Rule(_template, "a template of explore_jax.data.templates.NAMES, "
                                  "or chat:NAME"),
    "benchmarks.*.reward_method": _lazy_one_of(_methods, "one of 'math_verify', 'dapo', "
                                               "'countdown' (explore_jax.rewards.METHODS)"),
    "benchmarks.*.max_problems": integer(),
    "mesh.shape": mesh_shape(),
    "distributed.num_processes": integer(1),
    "distributed.process_id": integer(0),
    "distributed.cpu_collectives": one_of("", "gloo", "mpi"),
}

EVAL_RELATIONS: list[Relation] = [
    (("synthetic",), _generated("synthetic")),
    (("countdown",), _generated("countdown")),
]


def check_eval_config(config: ml_collections.ConfigDict) -> None:
  """Raise one ValueError naming every refused setting of an evaluator config."""
  raise_if_bad("config", problems(config, EVAL_RULES, EVAL_RELATIONS))


# --------------------------------------------------------------------------------------------------
# Once the data and the tokenizer are loaded
# --------------------------------------------------------------------------------------------------

MOST = 0.5  # refuse when more than this share of the prompts would be cut


def prompt_lengths(records, template: str, tokenizer, sample: int = 2048) -> np.ndarray:
  """Token counts of the templated prompts of up to `sample` records, evenly spaced over the
  dataset (every record when it holds fewer)."""
  from explore_jax.data import templates  # pylint: disable=g-import-not-at-top
  n = len(records)
  idx = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64)) if n else []
  texts = [templates.apply_template(template, records[int(i)]["problem"], tokenizer)
           for i in idx]
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
  return np.array([len(x) for x in ids], np.int64)


def check_prompt_lengths(lengths: np.ndarray, max_prompt_len: int, key: str = "data.max_prompt_len"
                         ) -> None:
  """Refuse when most prompts are longer than `max_prompt_len` (they would be cut to their last
  tokens, the problem's start lost); warn when some are."""
  if not len(lengths):
    return
  cut = float(np.mean(lengths > max_prompt_len))
  if not cut:
    return
  need = int(np.percentile(lengths, 99, method="higher"))
  what = (f"{cut:.0%} of the prompts ({int(np.sum(lengths > max_prompt_len))} of {len(lengths)} "
          f"looked at) are longer than {key}={max_prompt_len} tokens and would be cut to their "
          f"last {max_prompt_len}; the longest is {int(lengths.max())}, 99% fit in {need}")
  if cut > MOST:
    raise ValueError(f"config: {what}.\n  {key}={max_prompt_len}: must be at least the length "
                     f"of most prompts (e.g. {need})")
  logging.warning("%s", what)
