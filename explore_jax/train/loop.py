r"""RL fine-tuning with GRPO or PPO and the entropy-based advantage: the training loop.

    python -m explore_jax.train --config configs/tiny_cpu.py --workdir /tmp/run \
        [--config.rl.alpha=0.2 ...]

Each step: sample a rollout of `rollout.n` responses per prompt -> grade them -> score the rollout
with the trainer's own forward pass (old log-probs, values, advantages) -> several mini-batch updates
(the actor loss adds the paper's psi to every token's advantage when `rl.entropy_advantage`) ->
metrics, checkpoints. Running the same command on the same workdir resumes from the newest complete
checkpoint. SIGTERM on any process saves at the next step boundary on every process, and all exit 0.

`train` reads top to bottom as named steps: `set_up` (distributed, mesh, model, the step's static
config, optimizers, the state's shapes), `restore` (the newest checkpoint, else the model's
weights), `prompt_stream` (the data, whose prompt lengths are checked first against
`data.max_prompt_len`), then per step `run_step` (rollout -> grade -> score ->
updates -> metrics) and `save_if_due`, and at the end `export_final`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from explore_jax import data as data_lib
from explore_jax import paths, provenance
from explore_jax import rewards as rewards_lib
from explore_jax.config import check as config_check
from explore_jax.data import pipeline
from explore_jax.models import checkpoint
from explore_jax.rl import actor_loss
from explore_jax.tpu import sharding
from explore_jax.train import collect, export, setup
from explore_jax.train import metrics as metrics_io
from explore_jax.train import state as train_state
from explore_jax.train import step as train_step


@dataclasses.dataclass(frozen=True)
class Run:
  """What every step of a run reads: fixed once `set_up` has built it."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  rules: tuple
  model_cfg: Any  # qwen2.Qwen2Config
  cfg: train_step.StepConfig  # the update's static config
  score_cfg: train_step.StepConfig  # the scoring pass's (loss-free: one compile for every variant)
  optim: setup.Optimizers
  shapes: train_state.TrainState  # of the state, from shapes alone
  shardings: train_state.TrainState
  model_dir: str  # on this host's disk ("" in the dry run)
  tokenizer_dir: str

  @property
  def ppo(self) -> bool:
    return self.cfg.algorithm == "ppo"

  @property
  def rows(self) -> int:
    return self.config.data.prompts_per_step * self.config.rollout.n


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Train (or resume) the run of `config` in `workdir`; exports the actor at the end. The
  workdir and the config's local paths are made absolute here, once: orbax, a subprocess or a
  later chdir then see the same places (a relative workdir once lost its checkpoints). A bad
  setting is refused first, before anything is written or loaded."""
  config_check.check_train_config(config)
  workdir = paths.absolute(workdir)
  config = setup.with_absolute_paths(config)
  run = set_up(config, workdir)
  if config.dry_run:
    dry_run(run)
    return
  tokenizer, eos_id, pad_id = load_tokenizer(run)
  records = load_records(config)
  # Needs the data and the tokenizer, so here: before the model's weights load or a rollout.
  config_check.check_prompt_lengths(
      config_check.prompt_lengths(records, config.data.template, tokenizer),
      config.data.max_prompt_len)
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    ckpt = train_state.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    setup.check_resume_config(workdir, config, has_checkpoint=bool(ckpt.manager.all_steps()))
    sharding.on_main(lambda: write_run_files(run), f"train: writing {workdir}")
    state, data_state, ref_params = restore(run, ckpt)
    prompts = prompt_stream(config, records, data_state)
    start = int(state.step)
    log = metrics_io.MetricsLog(workdir, start, enabled=jax.process_index() == 0)
    bar = progress_bar(config, start)
    stop = watch_sigterm()
    last_save = time.monotonic()
    with rewards_lib.RewardPool(max_workers=config.reward.workers,
                                timeout_s=config.reward.timeout_s) as pool:
      for step in range(start + 1, config.total_steps + 1):
        state, metrics = run_step(run, state, ref_params, next(prompts), tokenizer, pool, step,
                                  eos_id, pad_id, more_prompts=lambda: next(prompts))
        last = step == config.total_steps
        sigterm, timed = step_decision(stop["sigterm"], last_save,
                                       config.checkpoint_every_minutes)
        if last or sigterm or timed or step % config.checkpoint_every == 0:
          t0 = time.perf_counter()
          ckpt.save(step, state, prompts.get_state())  # async: the write goes on behind the loop
          metrics["perf/checkpoint_s"] = time.perf_counter() - t0
          last_save = time.monotonic()
        log.write(step, metrics)
        show_progress(bar, metrics)
        if sigterm and not last:
          close_after_sigterm(ckpt, log, bar, step)
          return
    ckpt.close()
    log.close()
    if bar is not None:
      bar.close()
    export_final(run, state)


# --------------------------------------------------------------------------------------------------
# The named steps
# --------------------------------------------------------------------------------------------------


def set_up(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Distributed start-up, the mesh, the model's files and architecture (shapes only in the dry
  run: no weights, no tokenizer), the step's static config, the optimizers, the state's shapes."""
  sharding.initialize_distributed(config.distributed)
  mesh = sharding.make_mesh(config.mesh.shape, what="--config.mesh.shape")
  rules = sharding.with_default_rules(config.mesh.rules)
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())
  if config.dry_run:
    model_dir = tokenizer_dir = ""
    model_cfg = setup.model_config(config)
  else:
    model_dir, tokenizer_dir = setup.resolve_model(config)
    model_cfg = setup.model_config(config, model_dir)
  setup.check_context(config, model_cfg)
  cfg = setup.step_config(config, model_cfg, tuple(mesh.shape.values()))
  optim = setup.optimizers(config)
  # Only now, with the model found and the config checked: a failed start leaves no workdir.
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  shapes, specs = train_state.abstract_state(model_cfg, optim.actor_tx, optim.critic_tx,
                                             cfg.algorithm == "ppo")
  return Run(config=config, workdir=workdir, mesh=mesh, rules=rules, model_cfg=model_cfg, cfg=cfg,
             score_cfg=dataclasses.replace(cfg, loss=actor_loss.LossConfig()), optim=optim,
             shapes=shapes, shardings=train_state.state_shardings(shapes, specs, mesh, rules),
             model_dir=model_dir, tokenizer_dir=tokenizer_dir)


def dry_run(run: Run) -> None:
  """--config.dry_run: the resolved config and the memory report; exit 1 if it does not fit."""
  if jax.process_index() == 0:
    setup.write_config(run.workdir, run.config)
  fits = setup.report_memory(run.config, run.model_cfg, run.shapes, run.shardings, run.mesh)
  if jax.devices()[0].platform == "cpu" and not run.config.dry_run_chip:
    from explore_jax.tpu import aot  # the devices are this host's memory: the host's peak
    fits = aot.print_host_peak(aot.host_peak(run.config, run.model_cfg, run.cfg, run.mesh))
  if not fits:
    raise SystemExit(1)


def load_tokenizer(run: Run):
  """(tokenizer, eos id, pad id): the model's own EOS when the tokenizer names none."""
  from explore_jax.data import tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.load(run.tokenizer_dir)
  eos_id = (tokenizer.eos_token_id if tokenizer.eos_token_id is not None
            else run.model_cfg.eos_token_id)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  return tokenizer, eos_id, pad_id


def write_run_files(run: Run) -> None:
  """config.json, environment.json, and the model's HF config and tokenizer beside the
  checkpoints: enough to export any of them (`python -m explore_jax.convert run-to-hf`) wherever
  the workdir can be read. Process 0 writes."""
  setup.write_config(run.workdir, run.config)
  provenance.note_start(run.workdir)  # the commit and versions; a warning if a resume changed them
  export.write_model_dir(run.workdir, run.model_cfg, run.config.model.path or run.model_dir,
                         run.model_dir, run.tokenizer_dir)


def restore(run: Run, ckpt: train_state.Checkpointer):
  """(state, data iterator state or None, reference params or None): the newest complete
  checkpoint, else a fresh state from the model's weights. The reference policy of the KL term is
  always the model's own weights."""
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          run.shapes, run.shardings)
  restored = ckpt.restore_latest(abstract)
  ref_params = None
  if restored is None or run.config.rl.kl_coef:
    _, params = checkpoint.load_model(run.model_dir, dtype=jnp.dtype(run.model_cfg.param_dtype),
                                      shardings=run.shardings.actor,
                                      scan_layers=run.model_cfg.scan_layers)
    ref_params = params if run.config.rl.kl_coef else None
  if restored is None:
    state = train_state.init_state(run.model_cfg, params, run.optim.actor_tx,
                                   run.optim.critic_tx, run.ppo, run.config.seed, run.shardings)
    return state, None, ref_params
  state, data_state = restored
  return state, data_state, ref_params


def load_records(config: ml_collections.ConfigDict):
  """The training problems (`data.name`'s `data.split`)."""
  return data_lib.load(config.data.name, config.data.split, config.data.data_dir or None,
                       **data_lib.generated_task_configs(config.data.synthetic,
                                                         config.data.countdown),
                       **data_lib.file_fields(config.data))


def prompt_stream(config: ml_collections.ConfigDict, records, data_state):
  """The global batches of prompts. Every process walks the same shuffled stream and keeps its
  own slice of each batch, so a run's batches do not depend on how many processes share it."""
  prompts = pipeline.prompt_batches(records, batch_size=config.data.prompts_per_step,
                                    seed=config.seed)
  if data_state is not None:
    prompts.set_state(data_state)
  return prompts


def run_step(run: Run, state, ref_params, batch: list, tokenizer, pool, step: int, eos_id: int,
             pad_id: int, more_prompts=None):
  """One RL step: rollout -> grade -> score (old log-probs, values, advantages) -> mini-batch
  updates. Returns the new state and the step's metrics (fetched to the host). With
  `rl.filter_groups`, `more_prompts()` gives the next batch of prompts when the step's groups
  lack signal (collect.sample_with_signal)."""
  config = run.config
  t0 = time.perf_counter()
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
  sample = lambda records, key: collect.sample_and_grade(
      config, run.model_cfg, state.actor, records, tokenizer, pool, run.mesh, run.rules, key,
      eos_id, pad_id)
  if config.rl.filter_groups:
    exp = collect.sample_with_signal(sample, batch, more_prompts, rng, config)
  else:
    exp = sample(batch, rng)
  rollout, scores, prompt_trunc, timing = exp.rollout, exp.scores, exp.prompt_truncated, exp.timing
  t1 = time.perf_counter()
  scored, metrics = train_step.score_rollout(state, ref_params, rollout, scores, exp.correct,
                                             cfg=run.score_cfg)
  train_actor = not run.ppo or step > config.rl.critic_warmup_steps
  state, update_metrics = train_step.update(state, scored, cfg=run.cfg,
                                            actor_tx=run.optim.actor_tx,
                                            critic_tx=run.optim.critic_tx,
                                            train_actor=train_actor)
  metrics.update(update_metrics)
  metrics.update(collect.rollout_metrics(rollout, scores, config))
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  t2 = time.perf_counter()
  metrics.update(step_metrics(run, step, metrics, prompt_trunc, timing,
                              update_s=t2 - t1, step_s=t2 - t0))
  check_finite(run, step, metrics)
  return state, metrics


def step_metrics(run: Run, step: int, metrics: dict, prompt_trunc: float, timing: dict, *,
                 update_s: float, step_s: float) -> dict:
  """Learning rates, timings and throughputs of a step (`metrics`: the step's own, read only)."""
  config, optim = run.config, run.optim
  warmup = 0 if not run.ppo else min(step, config.rl.critic_warmup_steps)
  actor_updates = optim.updates_per_step * (step - warmup)
  n_generated = metrics["rollout/response_length_mean"] * run.rows
  out = {
      "optim/actor_lr": float(optim.actor_lr(max(actor_updates - 1, 0))),
      "rollout/prompt_truncated_frac": prompt_trunc,
      "perf/rollout_s": timing["rollout"], "perf/reward_s": timing["reward"],
      "perf/update_s": update_s, "perf/step_s": step_s,
      "perf/rollout_tokens_per_s": n_generated / max(timing["rollout"], 1e-9),
      # Decode slot-steps that produced a token (the static engine's slots are its rows).
      "rollout/slot_utilization": timing["slot_utilization"],
      "rollout/retry_frac": timing["retry_frac"],
      # Padded [P + N] positions (with rl.length_buckets > 1 the update's model body runs over
      # perf/update_length_frac of them: the same rows in less time).
      "perf/update_tokens_per_s": config.rl.epochs * run.rows * (
          config.data.max_prompt_len + config.rollout.max_new_tokens) / max(update_s, 1e-9),
  }
  if config.rl.filter_groups:
    out.update({f"rollout/{k}": float(timing[k]) for k in (
        "groups_kept_frac", "filter_rounds", "groups_without_signal")})
  if run.ppo:
    out["optim/critic_lr"] = float(optim.critic_lr(max(optim.updates_per_step * step - 1, 0)))
  return out


def check_finite(run: Run, step: int, metrics: dict) -> None:
  """Every mini-batch update whose loss, gradient, new parameters or new optimizer state held a
  non-finite value was dropped inside the update (`train_step._apply`); here the step's metrics
  say so. `on_nonfinite="raise"` stops the run before the step is saved (a rerun resumes from
  the newest checkpoint), naming what was found where; "skip" warns and goes on."""
  found = []
  for part in ("actor", "critic"):
    at = metrics.get(f"{part}/nonfinite_at", -1.0)
    if at >= 0:
      params, opt = getattr(run.shapes, part), getattr(run.shapes, f"{part}_opt")
      found.append(f"{part}: {int(metrics[f'{part}/updates_dropped'])} of "
                   f"{run.optim.updates_per_step} mini-batch updates dropped, the first for a "
                   f"non-finite {train_step.nonfinite_names(params, opt)[int(at)]}")
  metric_names = [k for k, v in metrics.items() if not np.isfinite(v)]
  if metric_names:
    found.append(f"non-finite metrics {', '.join(metric_names)}")
  if not found:
    return
  if run.config.on_nonfinite == "raise":
    raise FloatingPointError(
        f"step {step}: {'; '.join(found)}. No dropped update was applied and nothing of step "
        f"{step} was saved: a rerun resumes from the newest checkpoint. If the cause is the "
        "data or a setting (optim.lr, ...), --config.on_nonfinite=skip drops such updates and "
        "goes on.")
  logging.warning("step %d: %s; going on (on_nonfinite=skip)", step, "; ".join(found))


def watch_sigterm() -> dict:
  """Our own SIGTERM handler on every process (it replaces the one of JAX's preemption service):
  a flag that `step_decision` all-reduces, so that a SIGTERM on any host stops every host at the
  same step boundary. The preemption sync point would do the same on a TPU pod but answers "no"
  without a distributed client (one process) and on CPU processes; the flag works everywhere for
  one tiny collective per step."""
  stop = {"sigterm": False}
  signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
  return stop


def step_decision(sigterm: bool, last_save: float, every_minutes: float) -> tuple[bool, bool]:
  """(stop, save for time) agreed by every process at a step boundary: stop when any process got
  a SIGTERM; save when process 0's clock says `every_minutes` have passed since the last save (0:
  never). Clocks and signals differ between hosts, so a local decision would send one process
  into orbax's save and another into the next step's collectives."""
  timed = bool(every_minutes) and time.monotonic() - last_save >= 60 * every_minutes
  flags = sharding.gather_ints([bool(sigterm), timed])
  return bool(flags[:, 0].max()), bool(flags[0, 1])


def close_after_sigterm(ckpt, log, bar, step: int) -> None:
  """Wait for the step's save, close the files; the process then exits 0."""
  t0 = time.perf_counter()
  ckpt.close()
  log.close()
  logging.warning("SIGTERM (on this or another process): saved step %d in %.1f s, exiting", step,
                  time.perf_counter() - t0)
  if bar is not None:
    bar.close()


def progress_bar(config: ml_collections.ConfigDict, start: int):
  if jax.process_index() != 0 or not config.progress_bar:
    return None
  from explore_jax.config import cli  # log lines above the bar, never inside it
  return cli.progress_bar(total=config.total_steps, initial=start, desc="train",
                          dynamic_ncols=True)


def show_progress(bar, metrics: dict) -> None:
  if bar is None:
    return
  bar.update(1)
  bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}",
                  len=f"{metrics['rollout/response_length_mean']:.0f}",
                  H=f"{metrics['rollout/entropy']:.3f}")


def export_final(run: Run, state) -> None:
  """The trained actor to WORKDIR/hf. A run rerun after it finished keeps its export untouched
  (evaluations key on its files). Process 0 decides, so that every process joins the export's
  gathers or none does."""
  hf_dir = os.path.join(run.workdir, "hf")
  stale = sharding.on_main(lambda: export.exported_step(hf_dir) != int(state.step), "train: export")
  if run.config.export_hf and sharding.from_main(np.array([bool(stale)], np.int32))[0]:
    # In the dtype of the model the run started from unless export_dtype says otherwise: a bf16
    # checkpoint trained with float32 master weights is exported in bf16 again.
    dtype = run.config.export_dtype or checkpoint.saved_dtype(run.model_dir)
    export.export_hf(run.model_cfg, state.actor, hf_dir, run.tokenizer_dir, int(state.step),
                     dtype=dtype, source_dir=run.model_dir)
