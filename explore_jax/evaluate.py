"""python -m explore_jax.evaluate --config configs/eval_paper.py --workdir DIR [--config.key=value]

The command line of `explore_jax.evaluation.evaluate.run`.
"""

from absl import app, flags
from ml_collections import config_flags

from explore_jax.config import cli as cli_lib
from explore_jax.evaluation import evaluate


def cli():
  """The command line (and the `explore-eval` console script)."""
  config = config_flags.DEFINE_config_file("config", None, "eval config file (configs/eval_*.py)",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None,
                                "output directory (results.json, responses, plots)")
  verbose = flags.DEFINE_bool("verbose", False, "Third-party INFO logs too (absl, tfds, ...).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    cli_lib.quiet_logs(verbose.value)
    cli_lib.run_main(lambda: evaluate.run(config.value, workdir.value))

  app.run(main)


if __name__ == "__main__":
  cli()
