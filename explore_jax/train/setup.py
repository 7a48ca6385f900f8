"""What a training run is built from: the jitted step's static config, the optimizers, the model
and tokenizer on this host's disk, the architecture from shapes alone, the check that a resumed
workdir runs the same experiment, and the dry run's memory report."""

from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

from etils import epath
from flax import traverse_util
import jax
import ml_collections
import optax

from explore_jax import paths
from explore_jax.config import defaults
from explore_jax.config.cli import BadValue
from explore_jax.models import checkpoint, qwen2
from explore_jax.models import files as model_files
from explore_jax.rl import actor_loss
from explore_jax.tpu import memory, sharding
from explore_jax.train import state as train_state
from explore_jax.train import step as train_step


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose local directories (`data.data_dir`, `model.stage_dir`) are
  absolute (`paths.absolute`); model and tokenizer paths follow `paths.locate` where they are
  read."""
  config = config.copy_and_resolve_references()
  config.data.data_dir = paths.absolute(config.data.data_dir)
  config.model.stage_dir = paths.absolute(config.model.stage_dir)
  return config


def step_config(config: ml_collections.ConfigDict, model_cfg: qwen2.Qwen2Config,
                mesh_shape: tuple[int, ...] = (1, 1, 1)) -> train_step.StepConfig:
  """The jitted step's static config; `mesh_shape` (data, fsdp, tensor) resolves the micro-batch
  (`memory.micro_batch_rows`). Expects a config that passed `config.check.check_train_config`."""
  rl = config.rl
  micro = memory.micro_batch_rows(rl, mesh_shape)
  loss = actor_loss.LossConfig(
      clip_low=rl.clip_low, clip_high=rl.clip_high, clip_c=rl.clip_c or None, agg=rl.agg,
      entropy_advantage=rl.entropy_advantage, alpha=rl.alpha, kappa=rl.kappa,
      entropy_clip=rl.entropy_clip, entropy_coef=rl.entropy_coef, kl_coef=rl.kl_coef,
      kl_kind=rl.kl_kind, policy_loss=rl.policy_loss, clip_cov_ratio=rl.clip_cov_ratio,
      clip_cov_lb=rl.clip_cov_lb, clip_cov_ub=rl.clip_cov_ub, kl_cov_ratio=rl.kl_cov_ratio,
      kl_cov_coef=rl.kl_cov_coef, top_entropy_fraction=rl.top_entropy_fraction)
  # The config's own ranges and relations are `config.check`'s (run first by the trainer and
  # explore_jax.aot); what is left needs the mesh and the process count.
  rows = config.data.prompts_per_step * config.rollout.n
  if rows % rl.mini_batch_size or rl.mini_batch_size % micro:
    raise ValueError(
        f"config: rollout rows ({config.data.prompts_per_step} prompts x {config.rollout.n} = "
        f"{rows}) must be a multiple of rl.mini_batch_size={rl.mini_batch_size}, itself a multiple "
        f"of the micro-batch ({memory.describe_micro_batch(rl, mesh_shape)})")
  wave = config.rollout.prompts_per_wave or config.data.prompts_per_step
  if config.rollout.engine in ("continuous", "paged"):  # one call per step (sample_and_grade)
    wave = config.data.prompts_per_step
  if config.data.prompts_per_step % wave or wave % jax.process_count():
    raise ValueError(
        f"config: data.prompts_per_step={config.data.prompts_per_step} must be a multiple of "
        f"rollout.prompts_per_wave={wave}, itself a multiple of the {jax.process_count()} "
        "processes")
  return train_step.StepConfig(
      model=model_cfg, loss=loss, algorithm=rl.algorithm, group_size=config.rollout.n,
      norm_by_std=rl.norm_by_std, gamma=rl.gamma, lam=rl.lam,
      whiten_advantages=rl.whiten_advantages, value_clip=rl.value_clip, epochs=rl.epochs,
      mini_batch_size=rl.mini_batch_size, micro_batch_size=micro,
      logit_chunk=rl.logit_chunk, on_nonfinite=config.on_nonfinite,
      length_buckets=rl.length_buckets, **suite_settings(config))


def suite_settings(config: ml_collections.ConfigDict) -> dict:
  """The exploration suite's settings of the jitted step: pass@k, the rollout correction, which
  statistics its selections use (their keys are checked by `config.check`)."""
  rl = config.rl
  return dict(passk_k=rl.passk_k if rl.passk else 0, tis_cap=float(rl.tis_cap),
              tis_mode=rl.tis_mode, token_stats=rl.token_stats)


class Optimizers(NamedTuple):
  updates_per_step: int  # optimizer steps per RL step
  actor_lr: optax.Schedule
  critic_lr: optax.Schedule
  actor_tx: optax.GradientTransformation
  critic_tx: optax.GradientTransformation


def optimizers(config: ml_collections.ConfigDict) -> Optimizers:
  rows = config.data.prompts_per_step * config.rollout.n
  updates_per_step = config.rl.epochs * rows // config.rl.mini_batch_size
  schedule = lambda lr: train_state.lr_schedule(lr, config.optim,
                                                updates_per_step * config.total_steps)
  actor_lr, critic_lr = schedule(config.optim.lr), schedule(config.optim.critic_lr)
  return Optimizers(updates_per_step, actor_lr, critic_lr,
                    train_state.make_optimizer(actor_lr, config.optim),
                    train_state.make_optimizer(critic_lr, config.optim))


def resolve_model(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(model dir, tokenizer dir) on this host's disk; an empty model.path means the cached tiny
  pre-trained base. model.path and model.tokenizer are local directories, gs:// directories
  (staged under model.stage_dir once per host) or hub ids ORG/NAME[@REV] (fetched into the hub
  cache by each host): `model_files.local_dir`. As in the evaluator, the hosts then check that
  they read the same files (every process calls this). The tokenizer directory must hold a
  Hugging Face tokenizer (checked here, before the workdir is touched)."""
  m = config.model
  if m.path:
    model_dir = model_files.local_dir(m.path, "config.model.path", m.stage_dir)
  else:
    from explore_jax.demo import pretrain  # the CPU default only
    model_dir = pretrain.base_model(config)
  tokenizer_dir = (model_files.local_dir(m.tokenizer, "config.model.tokenizer", m.stage_dir,
                                         kind="tokenizer") if m.tokenizer else model_dir)
  checkpoint.check_tokenizer_dir(tokenizer_dir, "config.model.tokenizer" if m.tokenizer
                                 else "config.model.path")
  sharding.check_same_on_every_host(f"train: the model files of {m.path or model_dir}",
                                    model_files.model_fingerprint(model_dir))
  if m.tokenizer:
    sharding.check_same_on_every_host(f"train: the tokenizer files of {m.tokenizer}",
                                      model_files.model_fingerprint(tokenizer_dir))
  return model_dir, tokenizer_dir


def model_config(config: ml_collections.ConfigDict, model_dir: str | None = None
                 ) -> qwen2.Qwen2Config:
  """The model's architecture from shapes alone (for the dry run and `explore_jax.aot`):
  `model_dir`/config.json; else model.path's config.json (a hub id fetches that file alone, a
  gs:// directory is read in place); else, for a bare name that is no directory (the 7B configs'
  "Qwen2.5-7B"), the preset of that name (`qwen2.PRESETS`); the config's dtypes and remat
  applied. Needs no weights, no tokenizer."""
  if model_dir is None and not config.model.path:
    model_dir = resolve_model(config)[0]
  path = model_dir or config.model.path
  location = paths.locate(path)
  name = os.path.basename(os.path.normpath(path)).lower()
  if location.kind == "local" and not os.path.exists(location.path) and name in qwen2.PRESETS:
    cfg = qwen2.PRESETS[name]
  elif location.kind == "bucket":
    cfg = qwen2.Qwen2Config.from_hf_dict(
        json.loads((epath.Path(path) / "config.json").read_text()), source=f"{path}/config.json")
  else:  # names the directory if it holds no model
    cfg = checkpoint.load_model_config(
        model_files.local_dir(path, "config.model.path", kind="config"))
  m = config.model
  return cfg.replace(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                     attention=m.attention, scan_layers=m.scan_layers,
                     remat_policy=m.remat_policy)


def check_context(config: ml_collections.ConfigDict, model_cfg: qwen2.Qwen2Config) -> None:
  """A prompt + response budget beyond the positions the model was trained to (its
  max_position_embeddings: 4096 for Qwen2.5-Math) is refused before anything runs."""
  total = config.data.max_prompt_len + config.rollout.max_new_tokens
  if total > model_cfg.max_position_embeddings:
    raise BadValue(
        f"config.data.max_prompt_len + config.rollout.max_new_tokens = "
        f"{config.data.max_prompt_len} + {config.rollout.max_new_tokens} = {total} positions; "
        f"the model ({config.model.path or 'model.path'}) is trained to "
        f"{model_cfg.max_position_embeddings} (its max_position_embeddings): lower them")


# What a resumed run may change: how long and where it runs, its memory layout and bookkeeping,
# not what it computes. (With optim.schedule="cosine", total_steps is the schedule's horizon:
# extending it changes the learning rate from the resumed step on; a warning says so.)
RESUME_MAY_CHANGE = ("total_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                     "progress_bar", "export_hf", "export_dtype", "dry_run", "on_nonfinite",
                     "reward.workers", "reward.timeout_s", "distributed.", "mesh.", "model.remat",
                     "model.attention", "model.remat_policy", "model.path", "model.tokenizer",
                     "model.stage_dir", "data.data_dir", "rl.micro_batch_size",
                     "rl.micro_batch_per_shard", "rl.logit_chunk", "rl.length_buckets",
                     "rollout.prompts_per_wave", "rollout.engine", "rollout.slots",
                     "rollout.chunk", "rollout.kv_pages", "rollout.page_size",
                     "rollout.page_block", "rollout.page_attention")


def _flat(tree: dict) -> dict:
  return traverse_util.flatten_dict(tree, sep=".")


def _as_json(config: ml_collections.ConfigDict) -> dict:
  return _flat(json.loads(config.to_json_best_effort()))


def check_resume_config(workdir: str, config: ml_collections.ConfigDict,
                        has_checkpoint: bool) -> None:
  """A workdir with a checkpoint resumes only the run it was started with: a changed setting
  (other than RESUME_MAY_CHANGE) would silently continue the old run under the new name. Without
  a checkpoint (a run that failed before its first save) it starts afresh with any config. A key
  the old config.json lacks (added to explore_jax since) counts as its default then."""
  path = epath.Path(workdir) / "config.json"
  if not (has_checkpoint and path.exists()):
    return
  try:
    old = _flat(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); it records the config this workdir's "
                     "checkpoints were trained with") from e
  new, default = _as_json(config), _as_json(defaults.base_config())
  changed = [k for k in sorted(set(old) | set(new)) if k in new  # a key since removed: ignored
             and old.get(k, default.get(k)) != new[k] and not k.startswith(RESUME_MAY_CHANGE)]
  if changed:
    diff = ", ".join(f"{k}: {old.get(k, default.get(k))!r} -> {new[k]!r}" for k in changed)
    allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
    raise ValueError(f"{path}: this workdir holds a run started with a different config ({diff}). "
                     f"Rerun with the same config to resume it (only {allowed} may change), or "
                     "use a fresh workdir.")
  if config.optim.schedule != "constant" and old.get("total_steps") != new["total_steps"]:
    logging.warning("total_steps %s -> %s with optim.schedule=%s: the learning-rate schedule's "
                    "horizon moves from the resumed step on", old.get("total_steps"),
                    new["total_steps"], config.optim.schedule)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json, whole (another process may be reading it)."""
  paths.write_whole(epath.Path(workdir) / "config.json", config.to_json_best_effort(indent=2))


def device_memory(config) -> tuple[int | None, str]:
  """(HBM bytes per device, where the figure comes from) for the dry run's verdict:
  `dry_run_chip` when set (a CPU mesh standing in for a slice), else what the device reports."""
  if config.dry_run_chip:
    if config.dry_run_chip not in memory.HBM_BYTES:
      raise ValueError(f"config.dry_run_chip={config.dry_run_chip!r}: known chips "
                       f"{sorted(memory.HBM_BYTES)}")
    return memory.HBM_BYTES[config.dry_run_chip], f"a {config.dry_run_chip} chip"
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), jax.devices()[0].device_kind
  return None, jax.devices()[0].device_kind


def report_memory(config, model_cfg, shapes, shardings, mesh) -> bool:
  """--config.dry_run: per-device bytes of the sharded train state, and the analytic plan.
  Returns whether the plan's peak fits the device memory (90% of it usable); True when the
  device has no memory figure and `dry_run_chip` is empty (nothing to compare with)."""
  parts = {k: memory.measured_bytes(getattr(shapes, k), getattr(shardings, k))
           for k in ("actor", "actor_opt", "critic", "critic_opt")}
  total = sum(parts.values())
  print(f"mesh {dict(mesh.shape)}; train state per device (from shapes, nothing allocated):")
  for k, v in {**parts, "total": total}.items():
    print(f"  {k:<12s} {v:>16,d} bytes {v / 2**20:12.2f} MiB")
  plan = memory.print_plan_for_config(config, model_cfg, tuple(mesh.shape.values()))
  hbm, source = device_memory(config)
  peak = plan["totals"]["peak"]
  if hbm is None:
    print(f"{source} reports no memory size: set --config.dry_run_chip={{"
          f"{','.join(sorted(memory.HBM_BYTES))}}} to check the plan against a chip")
    return True
  usable = memory.USABLE * hbm
  verdict = "fits" if peak <= usable else "does not fit"
  print(f"{verdict}: peak {peak / 2**30:.2f} GiB per device against {usable / 2**30:.2f} GiB "
        f"usable (90% of {hbm / 2**30:.2f} GiB, {source})")
  return peak <= usable
