r"""The trainer's dry-run estimate of a CPU run's peak memory against the peak it measures.

    HF_HOME=DIR HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/host_memory.py [--layers 2]

On CPU the devices are the host's memory, so `--config.dry_run=True` prints the peak resident
size it expects (`explore_jax.tpu.aot.host_peak`: the CPU compiler's figures for the step's
programs, the process itself, the checkpoint's host copy). This script builds a Qwen2.5-0.5B-
shaped model with `--layers` decoder layers and random bf16 weights into the hub cache of HF_HOME
(as Qwen/Qwen2.5-0.5B; the project's tiny tokenizer), then for float32 and bfloat16 parameters
and 1 and 2 steps (a checkpoint after every step) runs the dry run and the real run of
configs/grpo_qwen25_small.py at a few rows and tokens, each in a process of its own, and prints
the estimate, the trainer process's own peak (VmHWM) and their ratio. The full 24-layer model
needs 14-20 GB; 2 layers keep it under 7 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ["--config.data.prompts_per_step=2", "--config.rollout.n=2",
         "--config.rl.mini_batch_size=4", "--config.rollout.max_new_tokens=8",
         "--config.data.max_prompt_len=32", "--config.rollout.slots=4",
         "--config.rl.logit_chunk=64", "--config.reward.workers=1", "--config.checkpoint_every=1",
         "--config.progress_bar=False"]


def _child(argv: list[str]) -> None:
  """Train with `argv` (the train CLI's flags) in this process; print its peak resident size."""
  from explore_jax.train import __main__ as train_main
  sys.argv = ["train"] + argv
  try:
    train_main.cli()
  except SystemExit as e:
    if e.code not in (0, None):
      raise
  finally:
    with open("/proc/self/status") as f:
      peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print(json.dumps({"peak_bytes": peak}), flush=True)


def _build(layers: int) -> None:
  sys.path.insert(0, os.path.join(REPO, "tests"))
  from conftest import fill_hub_cache
  from test_quickstart import qwen05_model
  import tempfile
  src = tempfile.mkdtemp()
  qwen05_model(src, layers=layers)
  fill_hub_cache(os.environ["HF_HOME"], "Qwen/Qwen2.5-0.5B", src)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--child", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  if args.child is not None:
    return _child(args.child)
  if not os.environ.get("HF_HOME"):
    sys.exit("set HF_HOME to a folder for the hub cache this script fills")
  _build(args.layers)
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  print(f"Qwen2.5-0.5B widths, {args.layers} layers, configs/grpo_qwen25_small.py:model=0.5b at "
        f"4 rows x 40 tokens; GiB")
  print(f"{'params':<9s} {'steps':>5s} {'dry run':>8s} {'measured':>9s} {'ratio':>6s}")
  for dtype in ("float32", "bfloat16"):
    for steps in (1, 2):
      flags = ["--config", "configs/grpo_qwen25_small.py:model=0.5b", "--workdir",
               f"/tmp/host_memory_{dtype}_{steps}", f"--config.total_steps={steps}",
               f"--config.model.param_dtype={dtype}", *SIZES]
      dry = subprocess.run([sys.executable, "-m", "explore_jax.train", *flags,
                            "--config.dry_run=True"], capture_output=True, text=True, env=env,
                           cwd=REPO, check=True).stdout
      estimate = float(re.search(r"peak resident size about ([\d.]+) GiB", dry)[1])
      subprocess.run(["rm", "-rf", f"/tmp/host_memory_{dtype}_{steps}"], check=True)
      out = subprocess.run([sys.executable, __file__, "--child", *flags], capture_output=True,
                           text=True, env=env, cwd=REPO, check=True).stdout
      measured = json.loads(out.strip().splitlines()[-1])["peak_bytes"] / 2**30
      print(f"{dtype:<9s} {steps:>5d} {estimate:>8.2f} {measured:>9.2f} "
            f"{estimate / measured:>6.2f}", flush=True)


if __name__ == "__main__":
  main()
