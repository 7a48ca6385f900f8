"""python -m explore_jax.analyze ...: the paper's entropy analyses on graded responses
(`explore_jax.evaluation.analyze`; --help lists the options)."""

from explore_jax.evaluation import analyze

if __name__ == "__main__":
  analyze.main()
