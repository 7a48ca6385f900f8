"""What one decode step of the rollout engine reads on a TPU slice, by the TPU compiler's count:
the view read (every slot up to the longest row in flight) against the ragged read (each row's
filled blocks, `models/decode_attention.py`), at a config's shapes, compiled from shapes on CPU.

  .venv/bin/python benchmarks/decode_read_tpu.py                       # 7B GRPO config, v5p-64
  .venv/bin/python benchmarks/decode_read_tpu.py --topology v5p-8 --config configs/grpo_qwen25_7b.py

Needs `make tpu-compiler`. For each fill f (the rows' filled share of their P + N cache slots):
the view read with its longest row at f (the view's best case: at RL's long-tailed lengths the
longest row in flight is usually near the cap, so the view reads more; the engine's own views
are segment ends, these are any length) and the ragged read of every row filled to f. Figures per device from the compiled step's `cost_analysis()` ('bytes
accessed', the compiler's cost model, not a timing) and `memory_analysis()` (temporaries); the
step is `explore_jax.rollout.engine._decode_chunk` (a loop body is counted once: one step). The KV line
is what the cache holds per device; the weights line what a step must read of them at least.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "grpo_qwen25_7b.py"))
  parser.add_argument("--topology", default="v5p-64")
  parser.add_argument("--fills", default="1,0.5,0.25,0.125")
  args = parser.parse_args()

  from explore_jax.tpu import aot, sharding
  from explore_jax.train import setup

  config = _config(args.config)
  devices, chip = aot.topology_devices(args.topology)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  rules = sharding.with_default_rules(config.mesh.rules)
  model_cfg = setup.model_config(config)
  cfg = setup.step_config(config, model_cfg, tuple(mesh.shape.values()))
  decode, = aot.step_programs(config, model_cfg, cfg, mesh, only=("rollout/decode",))
  full = decode.static["ragged"]
  if full is None:
    raise SystemExit(f"{args.config}: rollout.kv_block is 0 (no ragged read to compare)")
  p, n = config.data.max_prompt_len, config.rollout.max_new_tokens
  params, engine = decode.args[0], decode.args[1]
  kv = aot._bytes(engine.cache.k) + aot._bytes(engine.cache.v)
  print(f"{args.config} on {args.topology} ({len(devices)} {chip} devices, mesh "
        f"{dict(mesh.shape)}): {config.rollout.slots} slots of {p} + {n}, kv_block {full.block}")
  print(f"per device: KV cache {kv / 2**30:.2f} GiB, weights {aot._bytes(params) / 2**30:.2f} GiB")
  print(f"{'fill':>6} {'read':<8} {'GiB accessed':>13} {'vs view':>8} {'temp GiB':>9} "
        f"{'compile s':>10}")

  def compiled(**static):
    prog = dataclasses.replace(decode, static={**decode.static, **static})
    exe, seconds = aot._compile(prog, mesh, rules)
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or "bytes accessed" not in cost:
      raise SystemExit(f"{args.topology}: the compiler gave no cost analysis")
    return float(cost["bytes accessed"]), exe.memory_analysis().temp_size_in_bytes, seconds

  for fill in (float(x) for x in args.fills.split(",")):
    view = compiled(view=max(p + 1, round(fill * (p + n))), ragged=None)
    blocks = max(1, math.ceil(fill * full.blocks))  # full.blocks: every slot of every row
    ragged = compiled(ragged=dataclasses.replace(full, blocks=blocks))
    for name, (accessed, temp, seconds) in (("view", view), ("ragged", ragged)):
      print(f"{fill:>6.3f} {name:<8} {accessed / 2**30:>13.2f} {accessed / view[0]:>7.2f}x "
            f"{temp / 2**30:>9.2f} {seconds:>10.1f}", flush=True)


if __name__ == "__main__":
  main()
