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
import logging
import os
import signal
import time

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from explore_jax import data as data_lib
from explore_jax import provenance
from explore_jax import rewards as rewards_lib
from explore_jax.data import pipeline
from explore_jax.models import checkpoint
from explore_jax.rl import actor_loss
from explore_jax.tpu import sharding
from explore_jax.train import collect, export, setup
from explore_jax.train import metrics as metrics_io
from explore_jax.train import state as train_state
from explore_jax.train import step as train_step


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
    model_cfg = setup.model_config(config)
  else:
    model_dir, tokenizer_dir = setup.resolve_model(config)
    model_cfg = setup.model_config(config, model_dir)
  cfg = setup.step_config(config, model_cfg, tuple(mesh.shape.values()))
  # Scoring a rollout does not depend on the loss: one compilation serves every variant.
  score_cfg = dataclasses.replace(cfg, loss=actor_loss.LossConfig())
  ppo = cfg.algorithm == "ppo"

  # Optimizers and the state, from shapes.
  rows = config.data.prompts_per_step * config.rollout.n
  updates_per_step, actor_lr, critic_lr, actor_tx, critic_tx = setup.optimizers(config)
  shapes, specs = train_state.abstract_state(model_cfg, actor_tx, critic_tx, ppo)
  shardings = train_state.state_shardings(shapes, specs, mesh, rules)
  if config.dry_run:
    if is_main:
      setup.write_config(workdir, config)
    if not setup.report_memory(config, model_cfg, shapes, shardings, mesh):
      raise SystemExit(1)
    return

  # Tokenizer.
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model_cfg.eos_token_id
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    ckpt = train_state.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    setup.check_resume_config(workdir, config, has_checkpoint=bool(ckpt.manager.all_steps()))

    def write_run_files():
      setup.write_config(workdir, config)
      provenance.note_start(workdir)  # the commit and versions; a warning if a resume changed them
      # The model's HF config and tokenizer beside the checkpoints: enough to export any of them
      # (python -m explore_jax.convert run-to-hf) wherever the workdir can be read.
      checkpoint.write_hf_config(model_cfg, os.path.join(workdir, export.MODEL_DIR),
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
        rollout, scores, prompt_trunc, timing = collect.sample_and_grade(
            config, model_cfg, state.actor, next(prompts), tokenizer, pool, mesh, rules, rng,
            eos_id, pad_id)
        t2 = time.perf_counter()

        batch, metrics = train_step.score_rollout(state, ref_params, rollout, scores,
                                                  cfg=score_cfg)
        train_actor = not ppo or step > config.rl.critic_warmup_steps
        state, update_metrics = train_step.update(state, batch, cfg=cfg, actor_tx=actor_tx,
                                                  critic_tx=critic_tx, train_actor=train_actor)
        metrics.update(update_metrics)
        metrics.update(collect.rollout_metrics(rollout, scores, config))
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
    stale = sharding.on_main(lambda: export.exported_step(hf_dir) != int(state.step), "train: export")
    if config.export_hf and sharding.from_main(np.array([bool(stale)], np.int32))[0]:
      export.export_hf(model_cfg, state.actor, hf_dir, tokenizer_dir, int(state.step))

def step_decision(sigterm: bool, last_save: float, every_minutes: float) -> tuple[bool, bool]:
  """(stop, save for time) agreed by every process at a step boundary: stop when any process got
  a SIGTERM; save when process 0's clock says `every_minutes` have passed since the last save (0:
  never). Clocks and signals differ between hosts, so a local decision would send one process
  into orbax's save and another into the next step's collectives."""
  timed = bool(every_minutes) and time.monotonic() - last_save >= 60 * every_minutes
  flags = sharding.gather_ints([bool(sigterm), timed])
  return bool(flags[:, 0].max()), bool(flags[0, 1])
