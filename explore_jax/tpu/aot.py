r"""Compile the trainer's programs for a TPU slice on this (CPU) machine, from shapes alone.

    python -m explore_jax.aot --config configs/grpo_qwen25_7b.py --topology v5p-64 \
        [--config.key=value ...]

Before renting a slice: does each program of an RL step fit the chip's memory, and how much
does it compute? Nothing is allocated and no weights are read: the model is `model.path`'s
config.json, or the preset of that name (`qwen2.PRESETS`, e.g. the 7B configs' "Qwen2.5-7B").
The TPU compiler comes from libtpu: `make tpu-compiler` puts it in .venv/tpu-compiler, beside
the venv's packages rather than among them (so CPU runs never load it), where this module finds
it; or `pip install -e '.[tpu]'`. `--topology` is an accelerator type (`v5p-64`, `v4-32`,
`v5litepod-16`, `v6e-8`) or a topology (`v5p:2x4x4`, `v4:2x2x2`, `v5e:4x4`).

The programs of one step (the continuous rollout engine's, the trainer's default):

    rollout/prefill   one batch of ceil(slots / n) prompts into the engine's prompt pool
    rollout/insert    the pool's prefills copied into every slot (the largest refill)
    rollout/decode    a chunk of decode steps with every slot full (FLOPs: `rollout.chunk`
                      steps): the larger, in memory, of the ragged read of every block and the
                      largest cache view short of the whole cache (a chunk attending a view
                      holds a copy of it)
    score             the old log-probs (PPO: and values) of the step's rollout
    update            every mini-batch update of the step

With `rollout.engine=paged` (`explore_jax.rollout.paged`) the rollout's programs are the paged
engine's: rollout/prefill (a batch of prompts into pages of the pool) and rollout/decode (its
device loop: refill, page allocation, one decode step with the Pallas TPU paged attention
kernel, release; FLOPs: `rollout.chunk` steps); there is no insert. The report's `page_pool`
then says what the pool holds: its pages and bytes per device, and `pages.simulate` of one batch
shard at the paper's length distribution (responses geometric with a median of a quarter of
`max_new_tokens`, cut at it; prompts at the full `max_prompt_len`, an upper bound): the rows in
flight, the peak share of the pool in use, preemptions. A Pallas kernel reports no bytes or
FLOPs to the compiler's cost analysis, so the decode step's KV read is counted from the page
table: the rows' pages at that distribution, in whole kernel blocks, times the bytes of a
position; beside it the bytes the compiler counts for the rest of the step (the weights).

Memory per device, from each executable's `memory_analysis()`: arguments + outputs + temporaries
- the donated arguments aliased to outputs; plus what stays resident beside the program (during
the rollout, the train state and the engine buffers the program does not take; during the
update, the rollout). A program fits when that total is at most 90% of the chip's HBM (XLA's
scratch and fragmentation take the rest), as the trainer's dry run counts.

FLOPs per call. `cost_analysis()` counts a loop body once, and splash attention (a Pallas kernel)
reports no FLOPs. So each program's FLOPs come from compiles of its loop body alone: dense
attention, layers unrolled, at 1 and 2 layers (a program is exactly linear in its layer count:
F(L) = F(1) + (L - 1) (F(2) - F(1))), one micro-batch (score, update) or one decode step, for
one batch shard's rows on `tensor` chips of the topology (the batch axes split the work evenly),
then multiplied by the trip counts: micro-batches x updates, decode steps per chunk. They count
every sequence at its full length P + N (length buckets cut the update's) and dense attention's
full T x T scores (splash skips the masked half); the optimizer's elementwise work is counted
once per micro-batch instead of once per update (under 0.1% at 7B).

`--programs rollout/decode,update` compiles only those. The last line printed is one JSON
object: topology, devices, chip, hbm_bytes_per_device, mesh and `programs` {name:
{bytes_per_device, resident_bytes, flops, fits, compile_s, ...}} (a program the compiler refuses
for want of HBM has bytes_per_device null and its error). The exit status is 0 iff every program
fits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from explore_jax import paths
from explore_jax.config import check as config_check
from explore_jax.rl import actor_loss
from explore_jax.rollout import engine as rollout_engine
from explore_jax.rollout import paged, pages, sampling
from explore_jax.tpu import memory, sharding
from explore_jax.train import setup
from explore_jax.train import state as train_state
from explore_jax.train import step as train_step

USABLE = memory.USABLE  # of HBM, as the trainer's dry run counts

# Chips of a slice -> its torus (Cloud TPU docs: v4 / v5p are 3D, v5e / v6e 2D).
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8"}
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
# device_kind as libtpu names it -> memory.HBM_BYTES key (one JAX device per chip).
_CHIP_OF_KIND = {"TPU v4": "v4", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v5 lite": "v5e",
                 "TPU v5e": "v5e", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def topology_name(name: str) -> str:
  """`v5p-64` (the accelerator type: TensorCores on v4 / v5p, chips on v5e / v6e) -> `v5p:2x4x4`;
  a topology (`v5p:2x4x4`) is returned as it is."""
  if ":" in name:
    return name
  found = memory.slice_of(name)
  if found is None:
    raise ValueError(f"--topology {name!r}: give an accelerator type (v5p-64, v4-32, "
                     "v5litepod-16, v6e-8) or a topology (v5p:2x4x4, v5e:4x4)")
  chip, chips = found
  torus = (_TORUS_3D if chip in ("v4", "v5p") else _TORUS_2D).get(chips)
  if torus is None:
    raise ValueError(f"--topology {name!r}: no {chip} slice of {chips} chips known here; give "
                     "its topology instead (e.g. v5p:4x4x8)")
  return f"{chip}:{torus}"


def topology_devices(name: str) -> tuple[list, str]:
  """(TPU devices of the topology, one per chip, to build a mesh on; the chip's name)."""
  beside = os.path.join(paths.REPO_ROOT, ".venv", "tpu-compiler")  # `make tpu-compiler` puts it
  if importlib.util.find_spec("libtpu") is None and os.path.isdir(beside):
    sys.path.append(beside)
  if importlib.util.find_spec("libtpu") is None:
    raise SystemExit(f"explore_jax.aot: the TPU compiler (libtpu) is not installed: `make "
                     f"tpu-compiler` (puts it in {beside}) or pip install -e '.[tpu]'")
  from jax.experimental import topologies
  topo = topology_name(name)
  kw = {"chip_config_name": "megacore"} if topo.startswith("v4:") else {}  # one device per chip
  devices = topologies.get_topology_desc(topology_name=topo, platform="tpu", **kw).devices
  kind = devices[0].device_kind
  if kind not in _CHIP_OF_KIND:
    raise ValueError(f"--topology {name!r}: device kind {kind!r} has no HBM figure here "
                     f"(known: {sorted(_CHIP_OF_KIND)})")
  return list(devices), _CHIP_OF_KIND[kind]


# --------------------------------------------------------------------------------------------------
# The programs, from shapes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
  name: str
  fn: object  # a jitted function
  args: tuple  # abstract (ShapeDtypeStruct with shardings)
  static: dict  # its static keyword arguments
  resident: int  # bytes per device held beside it
  seconds: float = 0.0  # compile time spent on it before (the scoring pass, for its shardings)


def _abstract(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)


def _rows(shape, dtype, mesh):
  """A batch-sharded [R, ...] input."""
  names = ("batch",) + (None,) * (len(shape) - 1)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.logical_sharding(names, shape, mesh))


def _replicated(shape, dtype, mesh):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))


def _bytes(tree) -> int:
  leaves = jax.tree.leaves(tree)
  return memory.measured_bytes(leaves, [x.sharding for x in leaves])


PROGRAMS = ("rollout/prefill", "rollout/insert", "rollout/decode", "score", "update")


def step_programs(config: ml_collections.ConfigDict, model_cfg, cfg: train_step.StepConfig,
                  mesh, *, rows: int | None = None,
                  only: tuple[str, ...] = PROGRAMS) -> list[Program]:
  """The programs of one RL step on `mesh` (module docstring), those named in `only`. `rows`
  (score, update) overrides the config's, for the FLOPs compiles."""
  n, p, new = config.rollout.n, config.data.max_prompt_len, config.rollout.max_new_tokens
  rows = rows or config.data.prompts_per_step * n
  ppo = cfg.algorithm == "ppo"
  _, _, _, actor_tx, critic_tx = setup.optimizers(config)
  shapes, specs = train_state.abstract_state(model_cfg, actor_tx, critic_tx, ppo)
  rules = sharding.with_default_rules(config.mesh.rules)
  state = _abstract(shapes, train_state.state_shardings(shapes, specs, mesh, rules))
  params = state.actor
  state_b, actor_b = _bytes(state), _bytes(params)

  if config.rollout.engine == "paged":
    rollout_progs = _paged_programs(config, model_cfg, mesh, params, state_b - actor_b)
  else:
    rollout_progs = _continuous_programs(config, model_cfg, mesh, params, state_b, actor_b)

  # The rollout as the trainer hands it to the scoring pass: rows over the batch axes.
  rollout = sampling.Rollout(
      tokens=_rows((rows, new), jnp.int32, mesh), logprobs=_rows((rows, new), jnp.float32, mesh),
      entropy=_rows((rows, new), jnp.float32, mesh), mask=_rows((rows, new), jnp.int32, mesh),
      lengths=_rows((rows,), jnp.int32, mesh), finish_reason=_rows((rows,), jnp.int32, mesh),
      prompt_tokens=_rows((rows, p), jnp.int32, mesh),
      prompt_mask=_rows((rows, p), jnp.int32, mesh))
  scores = _rows((rows,), jnp.float32, mesh)
  correct = _rows((rows,), jnp.float32, mesh)  # read by the pass@k advantage only
  score_cfg = dataclasses.replace(cfg, loss=actor_loss.LossConfig())
  ref = params if config.rl.kl_coef else None
  score = Program("score", train_step.score_rollout, (state, ref, rollout, scores, correct),
                  dict(cfg=score_cfg), 0)
  if "update" not in only:
    return [prog for prog in (*rollout_progs, score) if prog.name in only]
  # The update's batch is the scoring pass's output, in the shardings the compiler gave it.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    t0 = time.perf_counter()
    compiled = score.fn.lower(*score.args, **score.static).compile()
    score.seconds = time.perf_counter() - t0
    batch_shapes = jax.eval_shape(lambda *a: score.fn(*a, **score.static)[0], *score.args)
  batch = _abstract(batch_shapes, compiled.output_shardings[0])
  update = Program("update", train_step.update, (state, batch),
                   dict(cfg=cfg, actor_tx=actor_tx, critic_tx=critic_tx, train_actor=True),
                   _bytes((rollout, scores)))  # the rollout is still held for its metrics
  return [prog for prog in (*rollout_progs, score, update) if prog.name in only]


def _sampler(config) -> sampling.Sampler:
  return sampling.Sampler(float(config.rollout.temperature), int(config.rollout.top_k),
                          float(config.rollout.top_p))


def _continuous_programs(config, model_cfg, mesh, params, state_b: int, actor_b: int
                         ) -> list[Program]:
  """The continuous engine's prefill, insert and decode, from shapes."""
  n, p, new = config.rollout.n, config.data.max_prompt_len, config.rollout.max_new_tokens
  # The engine's buffers (rollout_engine.run builds them the same way).
  slots = config.rollout.slots or config.data.prompts_per_step * n
  f = rollout_engine.prefill_batch(slots, n)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  engine_shapes = jax.eval_shape(lambda k: rollout_engine.empty_state(
      model_cfg, slots, config.data.prompts_per_step * n, p, new, k, 0), key)
  engine = _abstract(engine_shapes, rollout_engine.state_shardings(engine_shapes, mesh))
  pool_shapes = jax.eval_shape(lambda: rollout_engine.empty_pool(model_cfg, 2 * f, p))
  pool = _abstract(pool_shapes, rollout_engine.pool_shardings(pool_shapes, mesh))
  engine_b, pool_b = _bytes(engine), _bytes(pool)
  i32 = lambda *s: _replicated(s, jnp.int32, mesh)
  rng = _replicated(key.shape, key.dtype, mesh)
  sampler = _sampler(config)
  prefill = Program("rollout/prefill", rollout_engine._prefill,
                    (params, pool, i32(f, p), i32(f, p), i32()),
                    dict(config=model_cfg, mesh=mesh), state_b - actor_b + engine_b)
  insert = Program("rollout/insert", rollout_engine._insert,
                   (engine, pool, rng, i32(), *(i32(slots) for _ in range(5))),
                   dict(sampler=sampler, max_new_tokens=new, mesh=mesh), state_b)
  decode = Program("rollout/decode", rollout_engine._decode_chunk,
                   (params, engine, i32(), i32(), i32()),
                   dict(config=model_cfg, sampler=sampler, view=p + new,
                        ragged=rollout_engine.full_ragged(engine_shapes, config.rollout.kv_block,
                                                          mesh), mesh=mesh),
                   state_b - actor_b + pool_b)
  return [prefill, insert, decode]


def paged_plan(config, model_cfg, mesh) -> pages.Plan:
  """The paged engine's plan of a step on `mesh` (the Pallas TPU kernel, as `auto` on TPU)."""
  r = config.rollout
  return pages.make_plan(model_cfg, config.data.prompts_per_step, config.data.max_prompt_len,
                         max_new_tokens=r.max_new_tokens, n=r.n, slots=r.slots,
                         kv_pages=r.kv_pages, page_size=r.page_size, page_block=r.page_block,
                         kernel=pages.kernel_for("tpu", r.page_attention), mesh=mesh)


def _paged_programs(config, model_cfg, mesh, params, resident: int) -> list[Program]:
  """The paged engine's prefill and decode loop, from shapes; beside them the train state less
  the actor's parameters (an argument). The page pool (and the prompts' pages in it) is the
  state's."""
  plan = paged_plan(config, model_cfg, mesh)
  g, fb = plan.shards, plan.batch
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  shapes = jax.eval_shape(lambda: paged.empty_state(
      model_cfg, plan, jnp.zeros((g, plan.rows, *key.shape), key.dtype),
      jnp.zeros((g, plan.prompts), jnp.int32), 0))
  state = _abstract(shapes, paged.state_shardings(shapes, plan))
  i32 = lambda *s: _replicated(s, jnp.int32, mesh)
  static = dict(config=model_cfg, plan=plan, sampler=_sampler(config))
  prefill = Program("rollout/prefill", paged._prefill,
                    (params, state, i32(g * fb, plan.prompt_width),
                     i32(g * fb, plan.prompt_width), i32(g, fb), i32()), static, resident)
  decode = Program("rollout/decode", paged._decode, (params, state, i32()),
                   {**static, "live_slots": plan.slots}, resident)
  return [prefill, decode]


def _compile(prog: Program, mesh, rules):
  """(the TPU executable, compile seconds). Only lowering runs under the mesh: an eager op there
  (a PRNGKey) would try to run on the topology's devices, which exist only to compile for."""
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = prog.fn.lower(*prog.args, **prog.static).compile()
  return compiled, prog.seconds + time.perf_counter() - t0


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _tensor_group(mesh, tensor: int) -> list:
  """`tensor` chips of the mesh's kind to compile one batch shard's work for: the mesh's first
  ones on v4 / v5p; on v5e / v6e, whose compiler wants every chip of a slice in a program, a
  slice of that many chips of its own."""
  devices = list(mesh.devices.reshape(-1))
  chip = _CHIP_OF_KIND[devices[0].device_kind]
  if chip in ("v4", "v5p") or tensor == len(devices):
    return devices[:tensor]
  if tensor not in _TORUS_2D:
    raise ValueError(f"FLOPs on {chip}: no slice of {tensor} chips (the mesh's tensor axis) "
                     "known here; use --noflops")
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(topology_name=f"{chip}:{_TORUS_2D[tensor]}",
                                           platform="tpu").devices)


def flops_per_call(config, model_cfg, cfg: train_step.StepConfig, mesh,
                   only: tuple[str, ...] = PROGRAMS) -> dict[str, float]:
  """FLOPs per device of one call of each program (module docstring): loop bodies compiled alone
  at 1 and 2 unrolled layers with dense attention, for one batch shard's rows on one tensor group
  of the topology's chips, times their trip counts."""
  rows = config.data.prompts_per_step * config.rollout.n
  micro = cfg.micro_batch_size
  trips = {"rollout/prefill": 1, "rollout/insert": 1, "rollout/decode": config.rollout.chunk,
           "score": rows // micro,
           "update": cfg.epochs * rows // cfg.mini_batch_size * (cfg.mini_batch_size // micro)}
  # The batch axes split the work evenly (FSDP gathers weights, which adds no FLOPs), so one
  # batch shard on a (1, 1, tensor) mesh does what each device of the whole mesh does. (On the
  # whole 32-chip v4 mesh libtpu counted about half of the output projection's and 3/4 of a
  # layer's FLOPs for the same per-device rows, against the closed form; on 4 chips it agreed.)
  shards, tensor = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["tensor"]
  group = sharding.make_mesh((1, 1, tensor), _tensor_group(mesh, tensor))
  local = config.copy_and_resolve_references()
  local.data.prompts_per_step = -(-config.data.prompts_per_step // shards)
  local.rollout.slots = -(-(config.rollout.slots or rows) // shards)
  local.rollout.kv_pages = config.rollout.kv_pages // shards
  local.mesh.shape = (1, 1, tensor)
  # One update of the fewest whole groups that fill whole micro-batches: its micro-batch loop
  # body, counted once, is one micro-batch.
  unit = math.lcm(micro // shards, config.rollout.n)
  rules = sharding.with_default_rules(config.mesh.rules)
  per_layers = []
  for layers in (1, 2):
    m = model_cfg.replace(num_hidden_layers=layers, scan_layers=False, attention="dense")
    body = dataclasses.replace(cfg, model=m, mini_batch_size=unit, epochs=1, length_buckets=1,
                               micro_batch_size=micro // shards,
                               logit_chunk=config.data.max_prompt_len
                               + config.rollout.max_new_tokens)
    progs = step_programs(local, m, body, group, rows=unit, only=only)
    per_layers.append({prog.name: _flops(_compile(prog, group, rules)[0]) for prog in progs})
  one, two = per_layers
  layers = model_cfg.num_hidden_layers
  return {k: trips[k] * (one[k] + (layers - 1) * (two[k] - one[k])) for k in one}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def compile_step(config: ml_collections.ConfigDict, topology: str, with_flops: bool = True,
                 only: tuple[str, ...] = PROGRAMS) -> dict:
  """Compile the programs of one step (those in `only`) for `topology`; the report (module
  docstring)."""
  config_check.check_train_config(config)
  unknown = sorted(set(only) - set(PROGRAMS))
  if unknown or not only:
    raise ValueError(f"--programs {','.join(only)}: unknown {unknown}; known: {PROGRAMS}")
  if config.rollout.engine not in ("continuous", "paged"):
    raise ValueError(f"config.rollout.engine={config.rollout.engine!r}: explore_jax.aot compiles "
                     "the continuous or the paged engine's programs")
  devices, chip = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh.shape, devices, what="--config.mesh.shape")
  rules = sharding.with_default_rules(config.mesh.rules)
  model_cfg = setup.model_config(config)
  hbm = memory.HBM_BYTES[chip]
  report = {"topology": topology, "devices": len(devices), "chip": chip,
            "hbm_bytes_per_device": hbm, "usable_bytes_per_device": int(USABLE * hbm),
            "mesh": dict(mesh.shape), "programs": {}}
  cfg = setup.step_config(config, model_cfg, tuple(mesh.shape.values()))
  for prog in step_programs(config, model_cfg, cfg, mesh, only=only):
    entries = [_memory(variant, mesh, rules, hbm) for variant in _read_variants(prog, config)]
    # The decode's reads: the one that needs the most memory (a refusal first).
    report["programs"][prog.name] = max(entries, key=lambda e: (e["bytes_per_device"] is None,
                                                                e["bytes_per_device"] or 0))
  if config.rollout.engine == "paged":
    report["page_pool"] = page_pool(config, model_cfg, mesh, report["programs"])
  if with_flops:
    for name, flops in flops_per_call(config, model_cfg, cfg, mesh, only).items():
      report["programs"][name]["flops"] = flops  # dense attention, unrolled: compiles at any size
    pool, decode = report.get("page_pool"), report["programs"].get("rollout/decode")
    if pool and decode:  # the Pallas kernel counts none: q.k and p.v of the positions it reads
      attention = (config.rollout.chunk * 4 * model_cfg.num_attention_heads * model_cfg.head_dim
                   * model_cfg.num_hidden_layers * pool["kv_read_positions_per_step"])
      decode["attention_flops"] = attention
      decode["flops"] += attention
  return report


def host_peak(config: ml_collections.ConfigDict, model_cfg, cfg: train_step.StepConfig,
              mesh) -> dict:
  """What a training process on CPU peaks at, for the dry run: there the devices are this host's
  memory, so the figure to check is the process's resident size. The analytic plan
  (`explore_jax.tpu.memory`) models what the TPU compiler keeps; XLA:CPU keeps more temporaries
  (for a 2-layer Qwen2.5-0.5B-width update, 2.05 GiB against the plan's 1.29), so the step's
  programs are compiled here for the CPU mesh and their own memory figures used, as
  `compile_step` does for a TPU slice. Added to the largest program: the process itself before any
  array (this process's resident size now: Python, JAX and the libraries), and, when a checkpoint
  is saved before a later step, the host copy of the whole train state that orbax's asynchronous
  save holds while that step runs (the live state is in the program's own figure)."""
  import resource

  import transformers  # noqa: F401  (the run loads its tokenizer with it: part of its process)
  rules = sharding.with_default_rules(config.mesh.rules)
  with open("/proc/self/statm") as f:
    process = int(f.read().split()[1]) * resource.getpagesize()
  only = PROGRAMS if config.rollout.engine == "continuous" else ("score", "update")
  programs = {}
  for prog in step_programs(config, model_cfg, cfg, mesh, only=only):
    entries = [_memory(v, mesh, rules, 2**62) for v in _read_variants(prog, config)]
    programs[prog.name] = max(e["bytes_per_device"] for e in entries)
  _, _, _, actor_tx, critic_tx = setup.optimizers(config)
  shapes, specs = train_state.abstract_state(model_cfg, actor_tx, critic_tx,
                                             cfg.algorithm == "ppo")
  state = _bytes(_abstract(shapes, train_state.state_shardings(shapes, specs, mesh, rules)))
  copy = checkpoint_copy_bytes(config, state * jax.local_device_count())
  program = max(programs.values()) * jax.local_device_count()
  return {"programs": programs, "process_bytes": process, "checkpoint_copy_bytes": copy,
          "peak_bytes": process + program + copy}


def checkpoint_copy_bytes(config: ml_collections.ConfigDict, state_bytes: int) -> int:
  """The host copy of the train state (`state_bytes` on this host) that an asynchronous save
  holds while the next step runs: none when no save comes before a later step."""
  saves_mid_run = config.total_steps > 1 and (config.checkpoint_every < config.total_steps
                                               or config.checkpoint_every_minutes > 0)
  return state_bytes if saves_mid_run else 0


def print_host_peak(report: dict) -> bool:
  """The host_peak report against this machine's memory; whether it fits."""
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print("host memory on CPU (the CPU compiler's figures for the step's programs, per device):")
  for name, b in report["programs"].items():
    print(f"  {name:<16s} {gib(b)}")
  print(f"  process before any array {gib(report['process_bytes'])}; checkpoint host copy "
        f"during the next step {gib(report['checkpoint_copy_bytes'])}")
  fits = report["peak_bytes"] <= total
  print(f"{'fits' if fits else 'does not fit'}: peak resident size about "
        f"{gib(report['peak_bytes'])} against this host's {gib(total)}")
  return fits


def page_pool(config, model_cfg, mesh, programs: dict) -> dict:
  """What the paged engine's pool holds (module docstring): per device, and `pages.simulate` of
  one batch shard at the paper's length distribution."""
  plan = paged_plan(config, model_cfg, mesh)
  r, p = config.rollout, config.data.max_prompt_len
  tensor = mesh.shape["tensor"] if model_cfg.num_key_value_heads % mesh.shape["tensor"] == 0 else 1
  # Keys and values of every layer, the kv heads of one device.
  position_bytes = (2 * model_cfg.num_hidden_layers * model_cfg.num_key_value_heads // tensor
                    * model_cfg.head_dim * jnp.dtype(model_cfg.dtype).itemsize)
  one = dataclasses.replace(plan, shards=1, read=dataclasses.replace(plan.read, mesh=None))
  median = r.max_new_tokens / 4
  sim = pages.simulate(one, [p] * plan.prompts, pages.draw_lengths(plan.rows, r.max_new_tokens,
                                                                   median))
  # A decode step with every slot live, its rows at the distribution's mix of lengths; and the
  # weights it reads: each device its tensor shard of every parameter, in the compute dtype.
  per_row = sim["kv_read_per_row_step"]
  read_bytes = plan.slots * per_row * position_bytes
  weight_bytes = (memory.param_count(model_cfg) * jnp.dtype(model_cfg.dtype).itemsize
                  / mesh.shape["tensor"])
  decode = programs.get("rollout/decode") or {}
  return {"kv_pages": plan.pages * plan.shards, "page_size": plan.page_size,
          "page_block": plan.read.block, "slots": plan.slots * plan.shards,
          "pages_per_device": plan.pages, "pool_bytes_per_device": plan.pages * plan.page_size
          * position_bytes,
          "contiguous_rows_same_bytes": plan.pages * plan.page_size * plan.shards
          // (p + r.max_new_tokens),
          "distribution": f"responses geometric, median {median:g} tokens, cut at "
                          f"{r.max_new_tokens}; prompts of {p} tokens",
          "rows_in_flight": sim["rows_in_flight"] * plan.shards,
          "peak_pool_share": sim["peak_pool_share"], "preemptions": sim["preemptions"],
          "decode_steps": sim["decode_steps"], "kv_read_over_filled": sim["kv_read_over_filled"],
          "kv_read_positions_per_step": plan.slots * per_row,
          "kv_read_bytes_per_step": read_bytes, "weight_bytes_per_step": weight_bytes,
          "compiler_bytes_accessed": decode.get("bytes_accessed"),
          "fits": bool(sim["peak_pool_share"] <= USABLE and decode.get("fits", True))}


def _read_variants(prog: Program, config) -> list[Program]:
  """The decode program as the engine may run it: the ragged read of every block (or the whole
  cache with kv_block 0) and the largest view short of the whole cache, the segment end below
  the last (`rollout_engine.run`'s views at `sampling.SEGMENTS`). Other programs: as they
  are."""
  if prog.name != "rollout/decode" or "view" not in prog.static:
    return [prog]
  p, new = config.data.max_prompt_len, config.rollout.max_new_tokens
  ends = sampling._segment_ends(new, sampling.SEGMENTS)
  if len(ends) < 2:
    return [prog]
  view = dataclasses.replace(prog, static={**prog.static, "view": p + ends[-2], "ragged": None})
  return [prog, view]


def _memory(prog: Program, mesh, rules, hbm: int) -> dict:
  """The report entry of one program: its memory per device from the compiled executable."""
  try:
    compiled, seconds = _compile(prog, mesh, rules)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The compiler itself refuses a program whose temporaries exceed the chip's HBM.
    return {"bytes_per_device": None, "resident_bytes": int(prog.resident), "fits": False,
            "error": str(e).splitlines()[0][:300]}
  m = compiled.memory_analysis()
  own = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
         + m.temp_size_in_bytes)
  total = own + prog.resident
  read = prog.static.get("ragged")
  if "plan" in prog.static:  # the paged engine: the compiler counts all but the kernel's reads
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    extra = {"read": f"paged ({prog.static['plan'].read.kernel})",
             "bytes_accessed": float((cost or {}).get("bytes accessed", 0.0)),
             # The Pallas kernel, compiled by Mosaic, is a custom call in the executable.
             "pallas_kernel": "tpu_custom_call" in compiled.as_text()}
  else:
    extra = ({"read": "ragged" if read else f"view of {prog.static['view']} slots"}
             if "view" in prog.static else {})
  return {"bytes_per_device": int(total), "program_bytes": int(own),
          "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes), "resident_bytes": int(prog.resident),
          "compile_s": round(seconds, 2), "fits": bool(total <= USABLE * hbm), **extra}


def print_report(report: dict) -> None:
  gib = lambda b: f"{b / 2**30:8.2f}"
  print(f"{report['topology']}: {report['devices']} {report['chip']} devices, mesh "
        f"{report['mesh']}, {report['hbm_bytes_per_device'] / 2**30:.1f} GiB HBM each "
        f"({USABLE:.0%} usable: {report['usable_bytes_per_device'] / 2**30:.2f} GiB)")
  print(f"{'program':<16s} {'args':>8s} {'out':>8s} {'alias':>8s} {'temp':>8s} {'resident':>8s} "
        f"{'total':>8s}  GiB per device   {'TFLOP/call':>10s} {'compile s':>9s}")
  for name, p in report["programs"].items():
    if p["bytes_per_device"] is None:
      print(f"{name:<16s} DOES NOT FIT: {p['error']}")
      continue
    flops = f"{p['flops'] / 1e12:10.3f}" if "flops" in p else f"{'-':>10s}"
    print(f"{name:<16s} {gib(p['argument_bytes'])} {gib(p['output_bytes'])} "
          f"{gib(p['alias_bytes'])} {gib(p['temp_bytes'])} {gib(p['resident_bytes'])} "
          f"{gib(p['bytes_per_device'])}  {'fits' if p['fits'] else 'DOES NOT FIT':<16s} "
          f"{flops} {p['compile_s']:9.1f}")
  pool = report.get("page_pool")
  if pool:
    print(f"page pool: {pool['kv_pages']} pages of {pool['page_size']} positions "
          f"({pool['pages_per_device']} per device, {gib(pool['pool_bytes_per_device']).strip()} "
          f"GiB: the bytes of {pool['contiguous_rows_same_bytes']} contiguous rows), "
          f"{pool['slots']} slots, kernel blocks of {pool['page_block']} pages")
    print(f"  at {pool['distribution']}: {pool['rows_in_flight']:.0f} rows in flight on average, "
          f"peak {pool['peak_pool_share']:.0%} of the pool, {pool['preemptions']} preempted, "
          f"{pool['decode_steps']} decode steps; KV read {pool['kv_read_over_filled']:.3f}x the "
          f"filled positions")
    print(f"  a decode step with every slot live reads per device "
          f"{gib(pool['kv_read_bytes_per_step']).strip()} GiB of KV (from the page table) + "
          f"{gib(pool['weight_bytes_per_step']).strip()} GiB of weights (the compiler's bytes "
          f"accessed, which count no byte the kernel reads: "
          f"{gib(pool['compiler_bytes_accessed'] or 0).strip()} GiB); "
          f"{'fits' if pool['fits'] else 'DOES NOT FIT'}")
