"""python -m explore_jax.demo --config configs/demo.py --workdir runs/demo  (`make demo`)"""

import logging
import os

from absl import app, flags
import jax
from ml_collections import config_flags

from explore_jax.demo import study


def cli():
  """The command line (and the `explore-demo` console script)."""
  config = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", "runs/demo", "Where everything goes.")

  def main(argv):
    del argv
    logging.getLogger().setLevel(logging.WARNING)
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(workdir.value), "jax_cache"))
    study.run(config.value, workdir.value)

  app.run(main)


if __name__ == "__main__":
  cli()
