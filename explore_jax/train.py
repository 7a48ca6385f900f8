r"""RL fine-tuning with GRPO or PPO and the entropy-based advantage: the training loop.

    python -m explore_jax.train --config configs/tiny_cpu.py --workdir /tmp/run \
        [--config.rl.alpha=0.2 ...]

Each step: sample a rollout of `rollout.n` responses per prompt -> grade them -> score the rollout
with the trainer's own forward pass (old log-probs, values, advantages) -> several mini-batch updates
(the actor loss adds the paper's psi to every token's advantage when `rl.entropy_advantage`) ->
metrics, checkpoints. Running the same command on the same workdir resumes from the newest complete
checkpoint. SIGTERM on any process saves at the next step boundary on every process, and all exit 0.

Sections, top to bottom: flags; distributed + mesh; model and tokenizer; state from shapes; data and
rewards; resume; the loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time

from absl import app, flags
from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from explore_jax import checkpoint, defaults, memory, metrics_io, model_files, paths, provenance
from explore_jax import sharding, train_state, train_step
from explore_jax import data as data_lib
from explore_jax import rewards as rewards_lib
from explore_jax import sampling
from explore_jax.data import countdown, pipeline, templates
from explore_jax.models import qwen2
from explore_jax.rl import actor_loss


# --------------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------------


def step_config(config: ml_collections.ConfigDict, model_cfg: qwen2.Qwen2Config,
                mesh_shape: tuple[int, ...] = (1, 1, 1)) -> train_step.StepConfig:
  """The jitted step's static config; `mesh_shape` (data, fsdp, tensor) resolves the micro-batch
  (`memory.micro_batch_rows`)."""
  rl = config.rl
  micro = memory.micro_batch_rows(rl, mesh_shape)
  loss = actor_loss.LossConfig(
      clip_low=rl.clip_low, clip_high=rl.clip_high, clip_c=rl.clip_c or None, agg=rl.agg,
      entropy_advantage=rl.entropy_advantage, alpha=rl.alpha, kappa=rl.kappa,
      entropy_clip=rl.entropy_clip, entropy_coef=rl.entropy_coef, kl_coef=rl.kl_coef,
      kl_kind=rl.kl_kind)
  rows = config.data.prompts_per_step * config.rollout.n
  if rl.algorithm not in ("grpo", "ppo"):
    raise ValueError(f"config.rl.algorithm={rl.algorithm!r}: use 'grpo' or 'ppo'")
  if rows % rl.mini_batch_size or rl.mini_batch_size % micro:
    raise ValueError(
        f"config: rollout rows ({config.data.prompts_per_step} prompts x {config.rollout.n} = "
        f"{rows}) must be a multiple of rl.mini_batch_size={rl.mini_batch_size}, itself a multiple "
        f"of the micro-batch ({memory.describe_micro_batch(rl, mesh_shape)})")
  train_step.bucket_lengths(config.data.max_prompt_len + config.rollout.max_new_tokens,
                            rl.length_buckets)  # checks rl.length_buckets before any tracing
  if config.rollout.engine not in ("static", "continuous"):
    raise ValueError(f"config.rollout.engine={config.rollout.engine!r}: use 'continuous' or "
                     "'static'")
  if config.rollout.slots < 0 or config.rollout.chunk < 1 or config.rollout.kv_block < 0:
    raise ValueError(f"config.rollout.slots={config.rollout.slots} and config.rollout.kv_block="
                     f"{config.rollout.kv_block} must be >= 0, config.rollout.chunk="
                     f"{config.rollout.chunk} >= 1")
  if not 0.0 < config.rollout.refill_share <= 1.0:
    raise ValueError(f"config.rollout.refill_share={config.rollout.refill_share}: must be in "
                     "(0, 1]")
  wave = config.rollout.prompts_per_wave or config.data.prompts_per_step
  if config.rollout.engine == "continuous":  # one call per step (sample_and_grade)
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
      length_buckets=rl.length_buckets)


def optimizers(config: ml_collections.ConfigDict):
  """(optimizer steps per RL step, actor lr schedule, critic lr schedule, actor tx, critic tx)."""
  rows = config.data.prompts_per_step * config.rollout.n
  updates_per_step = config.rl.epochs * rows // config.rl.mini_batch_size
  schedule = lambda lr: train_state.lr_schedule(lr, config.optim,
                                                updates_per_step * config.total_steps)
  actor_lr, critic_lr = schedule(config.optim.lr), schedule(config.optim.critic_lr)
  return (updates_per_step, actor_lr, critic_lr, train_state.make_optimizer(actor_lr, config.optim),
          train_state.make_optimizer(critic_lr, config.optim))


def resolve_model(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(model dir, tokenizer dir) on this host's disk; an empty model.path means the cached tiny
  pre-trained base. A gs:// model.path or model.tokenizer is staged under model.stage_dir first,
  once per host (`model_files.stage_model`). As in the evaluator, the hosts then check that they
  read the same files (every process calls this)."""
  m = config.model
  if m.path:
    model_dir = _on_local_disk(m.path, m.stage_dir, "config.model.path")
  else:
    from explore_jax import pretrain  # the CPU default only
    model_dir = pretrain.base_model(config)
  tokenizer_dir = (_on_local_disk(m.tokenizer, m.stage_dir, "config.model.tokenizer")
                   if m.tokenizer else model_dir)
  sharding.check_same_on_every_host(f"train: the model files of {m.path or model_dir}",
                                    model_files.model_fingerprint(model_dir))
  if m.tokenizer:
    sharding.check_same_on_every_host(f"train: the tokenizer files of {m.tokenizer}",
                                      model_files.model_fingerprint(tokenizer_dir))
  return model_dir, tokenizer_dir


def _on_local_disk(path: str, stage_dir: str, field: str) -> str:
  if "://" not in path:
    return path
  return model_files.stage_model(path, stage_dir or paths.cache_dir("models"), field)


def model_config(config: ml_collections.ConfigDict, model_dir: str | None = None
                 ) -> qwen2.Qwen2Config:
  """The model's architecture from shapes alone (for the dry run and `explore_jax.aot`):
  `model_dir`/config.json, else (a bare `model.path` such as the 7B configs' "Qwen2.5-7B") the
  preset of that name; the config's dtypes and remat applied. Needs no weights, no tokenizer."""
  path = model_dir or config.model.path or resolve_model(config)[0]
  name = os.path.basename(os.path.normpath(path)).lower()
  if os.path.isdir(path) or name not in qwen2.PRESETS:
    cfg = checkpoint.load_model_config(path)  # names the directory if it holds no model
  else:
    cfg = qwen2.PRESETS[name]
  m = config.model
  return cfg.replace(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                     attention=m.attention, scan_layers=m.scan_layers,
                     remat_policy=m.remat_policy)


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


def sample_and_grade(config, model_cfg, params, records, tokenizer, pool, mesh, rules, rng,
                     eos_id: int, pad_id: int):
  """Sample `rollout.n` responses per prompt, in waves of `rollout.prompts_per_wave` prompts (the
  KV cache of a whole 7B rollout does not fit at once), and grade them.

  `records` is the global batch. Every process tokenizes and grades only its own slice of each
  wave; the rollout and the rewards are global arrays whose rows are prompt-major in the order of
  `records`, however many processes share the work.
  """
  n = config.rollout.n
  wave = config.rollout.prompts_per_wave or config.data.prompts_per_step
  if config.rollout.engine == "continuous":  # the slots bound the memory: one call per step
    wave = config.data.prompts_per_step
  rollouts, scores, truncated, timing = [], [], [], {"rollout": 0.0, "reward": 0.0}
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
    rollout, stats = sampling.generate(
        model_cfg, params, put(tokens), put(mask), rng,
        max_new_tokens=config.rollout.max_new_tokens, temperature=config.rollout.temperature,
        top_p=config.rollout.top_p, top_k=config.rollout.top_k, eos_id=eos_id, n=n, mesh=mesh,
        prompt_index=np.arange(first, first + wave), engine=config.rollout.engine,
        slots=config.rollout.slots, chunk=config.rollout.chunk, kv_block=config.rollout.kv_block,
        refill_share=config.rollout.refill_share, with_stats=True)
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
    local = pool.score(responses, answers, method=config.reward.method,
                       correct_reward=config.reward.correct,
                       incorrect_reward=config.reward.incorrect)
    scores.append(jax.make_array_from_process_local_data(
        sharding.logical_sharding(("batch",), (wave * n,), mesh, rules),
        np.asarray(local, np.float32)))
    rollouts.append(rollout)
    truncated.append(trunc)
    timing["rollout"] += t1 - t0
    timing["reward"] += time.perf_counter() - t1
  timing["slot_utilization"] = busy / max(slot_steps, 1)
  # Responses that checked a wrong value and tried again (countdown's verify-and-retry).
  timing["retry_frac"] = int(sharding.gather_ints([retried]).sum()) / len(records) / n
  if len(rollouts) == 1:
    return rollouts[0], scores[0], truncated[0], timing
  cat = lambda *xs: jnp.concatenate(xs, axis=0)
  return (jax.tree.map(cat, *rollouts), cat(*scores), float(np.mean(truncated)), timing)


# What a resumed run may change: how long and where it runs, its memory layout and bookkeeping,
# not what it computes. (With optim.schedule="cosine", total_steps is the schedule's horizon:
# extending it changes the learning rate from the resumed step on; a warning says so.)
RESUME_MAY_CHANGE = ("total_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                     "progress_bar", "export_hf", "dry_run", "on_nonfinite", "reward.workers",
                     "reward.timeout_s", "distributed.", "mesh.", "model.remat",
                     "model.attention", "model.remat_policy", "model.path", "model.tokenizer",
                     "model.stage_dir", "data.data_dir", "rl.micro_batch_size",
                     "rl.micro_batch_per_shard", "rl.logit_chunk", "rl.length_buckets",
                     "rollout.prompts_per_wave", "rollout.engine", "rollout.slots",
                     "rollout.chunk")


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


def check_finite(step: int, metrics: dict, mode: str) -> None:
  bad = [k for k, v in metrics.items() if not np.isfinite(v) or (k.endswith("update_finite")
                                                                   and v < 1)]
  if bad and mode == "raise":
    raise FloatingPointError(
        f"step {step}: non-finite {', '.join(bad)} (the update was not applied). Set "
        "--config.on_nonfinite=skip to drop such updates and go on.")
  if bad:
    logging.warning("step %d: non-finite %s; update skipped", step, bad)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
  sharding.initialize_distributed(config.distributed)
  is_main = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)

  # Mesh and logical-axis rules.
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = sharding.with_default_rules(config.mesh.rules)
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())

  # Model (the dry run needs its shapes only: no weights, no tokenizer).
  if config.dry_run:
    model_dir = tokenizer_dir = ""
    model_cfg = model_config(config)
  else:
    model_dir, tokenizer_dir = resolve_model(config)
    model_cfg = model_config(config, model_dir)
  cfg = step_config(config, model_cfg, tuple(mesh.shape.values()))
  # Scoring a rollout does not depend on the loss: one compilation serves every variant.
  score_cfg = dataclasses.replace(cfg, loss=actor_loss.LossConfig())
  ppo = cfg.algorithm == "ppo"

  # Optimizers and the state, from shapes.
  rows = config.data.prompts_per_step * config.rollout.n
  updates_per_step, actor_lr, critic_lr, actor_tx, critic_tx = optimizers(config)
  shapes, specs = train_state.abstract_state(model_cfg, actor_tx, critic_tx, ppo)
  shardings = train_state.state_shardings(shapes, specs, mesh, rules)
  if config.dry_run:
    if is_main:
      write_config(workdir, config)
    if not report_memory(config, model_cfg, shapes, shardings, mesh):
      raise SystemExit(1)
    return

  # Tokenizer.
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model_cfg.eos_token_id
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    ckpt = train_state.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    check_resume_config(workdir, config, has_checkpoint=bool(ckpt.manager.all_steps()))

    def write_run_files():
      write_config(workdir, config)
      provenance.note_start(workdir)  # the commit and versions; a warning if a resume changed them
      # The model's HF config and tokenizer beside the checkpoints: enough to export any of them
      # (python -m explore_jax.convert run-to-hf) wherever the workdir can be read.
      checkpoint.write_hf_config(model_cfg, os.path.join(workdir, MODEL_DIR),
                                 model_cfg.param_dtype, tokenizer_dir)

    sharding.on_main(write_run_files, f"train: writing {workdir}")
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    restored = ckpt.restore_latest(abstract)
    ref_params = None
    if restored is None or config.rl.kl_coef:
      _, params = checkpoint.load_model(model_dir, dtype=jnp.dtype(model_cfg.param_dtype),
                                        shardings=shardings.actor,
                                        scan_layers=model_cfg.scan_layers)
      ref_params = params if config.rl.kl_coef else None
    if restored is None:
      state = train_state.init_state(model_cfg, params, actor_tx, critic_tx, ppo, config.seed,
                                     shardings)
      data_state = None
    else:
      state, data_state = restored
    start = int(state.step)

    # Data: every process walks the same shuffled stream of global batches and keeps its own
    # slice of each, so a run's batches do not depend on how many processes share it.
    records = data_lib.load(config.data.name, config.data.split, config.data.data_dir or None,
                            **data_lib.generated_task_configs(config.data.synthetic,
                                                              config.data.countdown))
    prompts = pipeline.prompt_batches(records, batch_size=config.data.prompts_per_step,
                                      seed=config.seed)
    if data_state is not None:
      prompts.set_state(data_state)

    log = metrics_io.MetricsLog(workdir, start, enabled=is_main)
    stop = {"sigterm": False}
    # Our own handler on every process (it replaces the one of JAX's preemption service): a flag
    # that step_decision all-reduces, so that a SIGTERM on any host stops every host at the same
    # step boundary. The preemption sync point would do the same on a TPU pod but answers "no"
    # without a distributed client (one process) and on CPU processes; the flag works everywhere
    # for one tiny collective per step.
    signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    last_save = time.monotonic()
    bar = None
    if is_main and config.progress_bar:
      import tqdm
      bar = tqdm.tqdm(total=config.total_steps, initial=start, desc="train", dynamic_ncols=True)

    with rewards_lib.RewardPool(max_workers=config.reward.workers,
                                timeout_s=config.reward.timeout_s) as pool:
      for step in range(start + 1, config.total_steps + 1):
        t0 = time.perf_counter()
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
        rollout, scores, prompt_trunc, timing = sample_and_grade(
            config, model_cfg, state.actor, next(prompts), tokenizer, pool, mesh, rules, rng,
            eos_id, pad_id)
        t2 = time.perf_counter()

        batch, metrics = train_step.score_rollout(state, ref_params, rollout, scores,
                                                  cfg=score_cfg)
        train_actor = not ppo or step > config.rl.critic_warmup_steps
        state, update_metrics = train_step.update(state, batch, cfg=cfg, actor_tx=actor_tx,
                                                  critic_tx=critic_tx, train_actor=train_actor)
        metrics.update(update_metrics)
        metrics.update(rollout_metrics(rollout, scores, config))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t3 = time.perf_counter()

        actor_updates = updates_per_step * (step - (0 if not ppo else
                                                    min(step, config.rl.critic_warmup_steps)))
        n_generated = metrics["rollout/response_length_mean"] * rows
        metrics.update({
            "optim/actor_lr": float(actor_lr(max(actor_updates - 1, 0))),
            "rollout/prompt_truncated_frac": prompt_trunc,
            "perf/rollout_s": timing["rollout"], "perf/reward_s": timing["reward"],
            "perf/update_s": t3 - t2, "perf/step_s": t3 - t0,
            "perf/rollout_tokens_per_s": n_generated / max(timing["rollout"], 1e-9),
            # Decode slot-steps that produced a token (the static engine's slots are its rows).
            "rollout/slot_utilization": timing["slot_utilization"],
            "rollout/retry_frac": timing["retry_frac"],
            # Padded [P + N] positions (with rl.length_buckets > 1 the update's model body runs
            # over perf/update_length_frac of them: the same rows in less time).
            "perf/update_tokens_per_s": config.rl.epochs * rows * (
                config.data.max_prompt_len + config.rollout.max_new_tokens) / max(t3 - t2, 1e-9),
        })
        if ppo:
          metrics["optim/critic_lr"] = float(critic_lr(max(updates_per_step * step - 1, 0)))
        check_finite(step, metrics, config.on_nonfinite)
        last = step == config.total_steps
        sigterm, timed = step_decision(stop["sigterm"], last_save,
                                       config.checkpoint_every_minutes)
        if last or sigterm or timed or step % config.checkpoint_every == 0:
          t4 = time.perf_counter()
          ckpt.save(step, state, prompts.get_state())  # async: the write goes on behind the loop
          metrics["perf/checkpoint_s"] = time.perf_counter() - t4
          last_save = time.monotonic()
        log.write(step, metrics)
        if bar is not None:
          bar.update(1)
          bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                          acc=f"{metrics['reward/accuracy']:.2f}",
                          len=f"{metrics['rollout/response_length_mean']:.0f}",
                          H=f"{metrics['rollout/entropy']:.3f}")

        if sigterm and not last:
          t4 = time.perf_counter()
          ckpt.close()
          log.close()
          logging.warning("SIGTERM (on this or another process): saved step %d in %.1f s, "
                          "exiting", step, time.perf_counter() - t4)
          if bar is not None:
            bar.close()
          return
    ckpt.close()
    log.close()
    if bar is not None:
      bar.close()
    hf_dir = os.path.join(workdir, "hf")
    # A run rerun after it finished keeps its export untouched (evaluations key on its files).
    # Process 0 decides, so that every process joins the export's gathers or none does.
    stale = sharding.on_main(lambda: exported_step(hf_dir) != int(state.step), "train: export")
    if config.export_hf and sharding.from_main(np.array([bool(stale)], np.int32))[0]:
      export_hf(model_cfg, state.actor, hf_dir, tokenizer_dir, int(state.step))


def step_decision(sigterm: bool, last_save: float, every_minutes: float) -> tuple[bool, bool]:
  """(stop, save for time) agreed by every process at a step boundary: stop when any process got
  a SIGTERM; save when process 0's clock says `every_minutes` have passed since the last save (0:
  never). Clocks and signals differ between hosts, so a local decision would send one process
  into orbax's save and another into the next step's collectives."""
  timed = bool(every_minutes) and time.monotonic() - last_save >= 60 * every_minutes
  flags = sharding.gather_ints([bool(sigterm), timed])
  return bool(flags[:, 0].max()), bool(flags[0, 1])


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


EXPORT_RECORD = "explore_jax_export.json"  # in the export: the train step it holds
MODEL_DIR = "model"  # in the workdir: the model's HF config and tokenizer, no weights


def restore_actor(workdir: str, step: int | None = None
                  ) -> tuple[qwen2.Qwen2Config, qwen2.Params, int]:
  """(model config, actor params as numpy, step) of a run's checkpoint, the newest when `step` is
  None: only the actor is read, on this host, from a local or gs:// workdir."""
  import orbax.checkpoint as ocp

  hf_path = epath.Path(workdir) / MODEL_DIR / "config.json"
  if not hf_path.exists():
    raise FileNotFoundError(f"{hf_path}: missing; a run started before the trainer kept it "
                            "gets it when its command runs again")
  hf = json.loads(hf_path.read_text())
  model_cfg = qwen2.Qwen2Config.from_hf_dict(hf, source=os.fspath(hf_path),
                                             param_dtype=hf["torch_dtype"])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(ckpt_dir if "://" in ckpt_dir else os.path.abspath(ckpt_dir),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    steps = manager.all_steps()
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint of step "
                            f"{'any' if step is None else step}; saved: {sorted(steps)}")
  step = max(steps) if step is None else step
  # The actor alone: its shapes as the target, the rest of the state left on disk.
  stacked = train_state.saved_layout(os.path.join(ckpt_dir, str(step), "state")) == "stacked"
  model_cfg = model_cfg.replace(scan_layers=stacked)
  target = {"actor": qwen2.param_shapes(model_cfg)}
  args = ocp.args.PyTreeRestore(target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(os.path.join(ckpt_dir, str(step), "state"), args=args)
  return model_cfg, restored["actor"], step


def exported_step(path: str) -> int | None:
  """The train step of the export at `path`; None when there is none or it is unfinished."""
  try:
    return int(json.loads((epath.Path(path) / EXPORT_RECORD).read_text())["step"])
  except (OSError, ValueError, KeyError):
    return None


def export_hf(model_cfg, params, path: str, tokenizer_dir: str, step: int) -> None:
  """The trained actor as a Hugging Face directory, local or in a bucket. Every process takes part
  (each tensor is gathered from its shards); process 0 writes. The record of the step goes first
  out, last in, so a directory without it is an unfinished export that the next run redoes."""
  record = epath.Path(path) / EXPORT_RECORD
  sharding.on_main(lambda: record.unlink(missing_ok=True), f"export_hf: {record}")
  checkpoint.save_hf(model_cfg, params, path, tokenizer_dir=tokenizer_dir)
  if jax.process_index() == 0:
    record.write_text(json.dumps({"step": step}))
  logging.info("exported step %d to %s", step, path)


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


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  # Flags are defined here, not at import, so that other entry points (the demo) can import train.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics (local or gs://).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
