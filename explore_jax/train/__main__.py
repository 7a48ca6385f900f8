"""python -m explore_jax.train --config configs/tiny_cpu.py --workdir /tmp/run [--config.key=value]

Runs `explore_jax.train.loop.train`; the same command on the same workdir resumes the run.
Third-party libraries log warnings only; `--verbose` brings back their INFO lines.
"""

from absl import app, flags
from ml_collections import config_flags

from explore_jax.config import cli as cli_lib
from explore_jax.train import loop


def cli():
  """The command line (and the `explore-train` console script). Flags are defined here, not at
  import, so that importing this module has no side effects."""
  config = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Checkpoints and metrics (local or gs://).")
  verbose = flags.DEFINE_bool("verbose", False, "Third-party INFO logs too (absl, orbax, ...).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    cli_lib.quiet_logs(verbose.value)
    cli_lib.run_main(lambda: loop.train(config.value, workdir.value))

  app.run(main)


if __name__ == "__main__":
  cli()
