"""Is the demo bit-reproducible on this machine? Runs it twice from nothing and compares.

    python -m explore_jax.demo.repro --workdir runs/demo_check                 # `make demo-check`
    python -m explore_jax.demo.repro --workdir /tmp/rc --config configs/demo.py:steps=5   # shorter

Each run gets a fresh workdir (its own base model, compilation cache and evaluation), so nothing
is reused between them. The two `results.json` are compared number by number (all but the
wall-clock `seconds`), and every graded-responses file byte by byte. Exit status 0 iff they agree.
Same machine and same installed versions should agree exactly; another CPU need not (XLA:CPU
generates code for the instruction set it finds, which changes float rounding).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time


def _flatten(x, prefix=""):
  if isinstance(x, dict):
    for k, v in x.items():
      yield from _flatten(v, f"{prefix}.{k}" if prefix else k)
  elif isinstance(x, list):
    for i, v in enumerate(x):
      yield from _flatten(v, f"{prefix}[{i}]")
  else:
    yield prefix, x


def compare_results(a: dict, b: dict) -> list[str]:
  """Every figure that differs between two demo results.json (timings aside)."""
  fa, fb = (dict(_flatten({k: v for k, v in r.items() if k != "seconds"})) for r in (a, b))
  return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
          if fa.get(k) != fb.get(k)]


def compare_responses(dir_a: str, dir_b: str) -> tuple[int, list[str]]:
  """(files compared, those that differ) over every eval/**/responses.jsonl of two workdirs."""
  names = []
  for root, _, files in os.walk(os.path.join(dir_a, "eval")):
    names += [os.path.relpath(os.path.join(root, f), dir_a) for f in files
              if f == "responses.jsonl"]
  differ = [n for n in sorted(names) if not os.path.exists(os.path.join(dir_b, n))
            or not filecmp.cmp(os.path.join(dir_a, n), os.path.join(dir_b, n), shallow=False)]
  return len(names), differ


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="holds run1/ and run2/ (recreated)")
  parser.add_argument("--config", default="configs/demo.py")
  args = parser.parse_args()
  results = []
  for name in ("run1", "run2"):
    workdir = os.path.join(args.workdir, name)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "explore_jax.demo", f"--config={args.config}",
                    f"--workdir={workdir}"], check=True)
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    with open(os.path.join(workdir, "results.json")) as f:
      results.append(json.load(f))
  diffs = compare_results(*results)
  count, differ = compare_responses(*(os.path.join(args.workdir, n) for n in ("run1", "run2")))
  print(f"results.json: {len(diffs)} figures differ; responses files: {len(differ)} of {count} "
        "differ")
  for line in diffs + differ:
    print("  " + line)
  same = not diffs and not differ and count > 0
  print("IDENTICAL" if same else "DIFFERENT")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
