"""What the checkpoint digest costs: computing it vs saving the state it covers.

  .venv/bin/python benchmarks/checkpoint_digest.py [--width 768 --layers 12 --vocab 32000
                                                    --repeats 3 --dir /tmp/digest_bench]

The state is the trainer's for a GRPO run of a Qwen2 model of the given shape (default: about
110M parameters, float32): actor parameters plus AdamW's two moments, as
`explore_jax.train.state.init_state` builds it (random weights, nothing downloaded). Per repeat:

  digest    `explore_jax.train.digest.compute` over the whole state (jitted; the first call's
            compile is reported apart): what `Checkpointer.save` adds before each save, and
            what a restore adds after reading
  save      `Checkpointer.save` + `wait` into a fresh directory: the whole save, digest included,
            until the files are committed (the loop waits only for the blocking part)
  restore   `Checkpointer.restore_latest`: orbax's read plus the digest and finiteness check

It prints the median of each, and the digest as a share of the save and of the restore.

  .venv/bin/python benchmarks/checkpoint_digest.py --config configs/grpo_qwen25_7b.py \
      --topology v5p-32                                     (needs `make tpu-compiler`)

compiles the digest of the config's train state for a TPU slice from shapes (one program per
distinct array shape and sharding, as the trainer runs it) and prints the TPU compiler's bytes
accessed per device, next to the state's bytes per device.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from explore_jax.config import defaults
from explore_jax.models import qwen2
from explore_jax.tpu import sharding
from explore_jax.train import digest
from explore_jax.train import state as train_state


def build_state(width: int, layers: int, vocab: int):
  cfg = qwen2.Qwen2Config(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=width // 64,
                          num_key_value_heads=max(1, width // 256), tie_word_embeddings=True)
  optim = defaults.base_config().optim
  tx = train_state.make_optimizer(train_state.lr_schedule(1e-6, optim, 100), optim)
  shapes, specs = train_state.abstract_state(cfg, tx, tx, ppo=False)
  mesh = sharding.make_mesh((1, -1, 1))
  shardings = train_state.state_shardings(shapes, specs, mesh, sharding.DEFAULT_RULES)
  params = qwen2.init_params(cfg, jax.random.PRNGKey(0))
  state = train_state.init_state(cfg, params, tx, tx, False, 0, shardings)
  # Moments as after some training (not zeros, which would compress to nothing on disk).
  state = state.replace(actor_opt=jax.tree.map(
      lambda x: x + 1e-3 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))
      if jnp.issubdtype(x.dtype, jnp.floating) else x, state.actor_opt))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return state, abstract, n_params


def on_tpu(config_path: str, topology: str) -> None:
  """The TPU compiler's view of the digest of `config_path`'s train state on `topology`."""
  import importlib.util

  from explore_jax.tpu import aot
  from explore_jax.train import setup
  spec = importlib.util.spec_from_file_location("config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("")
  devices, chip = aot.topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  rules = sharding.with_default_rules(config.mesh.rules)
  optim = setup.optimizers(config)
  shapes, specs = train_state.abstract_state(setup.model_config(config), optim.actor_tx,
                                             optim.critic_tx, config.rl.algorithm == "ppo")
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, train_state.state_shardings(shapes, specs, mesh, rules))
  leaves, accessed, t0 = jax.tree.leaves(abstract), {}, time.perf_counter()
  for x in leaves:
    key = (x.shape, x.dtype, x.sharding)
    if key not in accessed:
      cost = digest._leaf_jit.lower(x).compile().cost_analysis()  # pylint: disable=protected-access
      accessed[key] = (cost[0] if isinstance(cost, list) else cost).get("bytes accessed", 0.0)
  state = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
  read = sum(accessed[(x.shape, x.dtype, x.sharding)] for x in leaves)
  print(f"{config_path} on {topology} ({chip}, {len(devices)} devices): {len(leaves)} arrays, "
        f"{len(accessed)} digest programs compiled in {time.perf_counter() - t0:.0f} s; train "
        f"state {state / 2**30:.2f} GiB per device; digest bytes accessed per device (TPU "
        f"compiler) {read / 2**30:.2f} GiB")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="", help="with --topology: the TPU compiler's view")
  parser.add_argument("--topology", default="")
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default="", help="where checkpoints go (default: a temp dir)")
  args = parser.parse_args()
  if args.topology:
    # As explore_jax.aot: the host runs nothing, libtpu only compiles.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    on_tpu(args.config, args.topology)
    return

  state, abstract, n_params = build_state(args.width, args.layers, args.vocab)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  print(f"state: {n_params / 1e6:.1f}M parameters, {state_bytes / 2**20:.0f} MiB "
        f"(params + AdamW mu, nu), {len(jax.tree.leaves(state))} arrays, "
        f"{jax.devices()[0].device_kind}")
  t0 = time.perf_counter()
  digest.compute(state)
  print(f"digest first call (compile + run): {time.perf_counter() - t0:.2f} s")

  root = args.dir or tempfile.mkdtemp(prefix="digest_bench_")
  times = {"digest": [], "save": [], "restore": []}
  for r in range(args.repeats):
    t0 = time.perf_counter()
    digest.compute(state)
    times["digest"].append(time.perf_counter() - t0)
    path = os.path.join(root, f"r{r}")
    ckpt = train_state.Checkpointer(path, keep=1)
    t0 = time.perf_counter()
    ckpt.save(1, state, {"pos": 0})
    ckpt.wait()
    times["save"].append(time.perf_counter() - t0)
    ckpt.close()
    ckpt = train_state.Checkpointer(path, keep=1)
    t0 = time.perf_counter()
    restored = ckpt.restore_latest(abstract)
    jax.block_until_ready(restored[0])
    times["restore"].append(time.perf_counter() - t0)
    ckpt.close()
    shutil.rmtree(path)
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  for k, v in times.items():
    print(f"{k:<8s} median {med[k]:7.3f} s   ({', '.join(f'{x:.3f}' for x in v)})")
  print(f"digest / save    {med['digest'] / med['save']:.3f}  (the save includes one digest)")
  print(f"digest / restore {med['digest'] / med['restore']:.3f}  (the restore includes one)")
  print(f"digest throughput {state_bytes / med['digest'] / 2**30:.2f} GiB/s")


if __name__ == "__main__":
  main()
