"""python -m explore_jax.evaluate --config configs/eval_paper.py --workdir DIR [--config.key=value]

The command line of `explore_jax.evaluation.evaluate.run`.
"""

from absl import app, flags
from ml_collections import config_flags

from explore_jax.evaluation import evaluate


def cli():
  """The command line (and the `explore-eval` console script)."""
  config = config_flags.DEFINE_config_file("config", None, "eval config file (configs/eval_*.py)",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None,
                                "output directory (results.json, responses, plots)")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: evaluate.run(config.value, workdir.value))


if __name__ == "__main__":
  cli()
