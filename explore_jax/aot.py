"""python -m explore_jax.aot --config configs/grpo_qwen25_7b.py --topology v5p-32

The command line of `explore_jax.tpu.aot`: compiles one training step's programs for a TPU
topology from shapes alone and reports their memory; exits 1 when a program does not fit.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from explore_jax.config import cli as cli_lib
from explore_jax.tpu import aot


def cli():
  """The command line (and the `explore-aot` console script)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; libtpu only compiles
  # No TPU is opened, so compiles in other processes (another aot, a test) need not wait for
  # libtpu's one-process lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  config = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).",
                                           lock_config=True)
  topology = flags.DEFINE_string("topology", None, "v5p-64, v4-32, v5litepod-16, v5p:2x4x4 ...")
  with_flops = flags.DEFINE_bool("flops", True, "Also count FLOPs per call (2 more small "
                                 "compiles per program)")
  programs = flags.DEFINE_list("programs", list(aot.PROGRAMS), "Only these programs")
  verbose = flags.DEFINE_bool("verbose", False, "Third-party INFO logs too (absl, jax, ...).")
  flags.mark_flags_as_required(["config", "topology"])

  def main(argv):
    del argv
    cli_lib.quiet_logs(verbose.value)
    report = cli_lib.run_main(lambda: aot.compile_step(
        config.value, topology.value, with_flops=with_flops.value, only=tuple(programs.value)))
    aot.print_report(report)
    print(json.dumps(report))
    fits = [p["fits"] for p in report["programs"].values()]
    fits += [report["page_pool"]["fits"]] if "page_pool" in report else []
    sys.exit(0 if all(fits) else 1)

  app.run(main)


if __name__ == "__main__":
  cli()
