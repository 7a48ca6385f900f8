"""python -m explore_jax.plots ...: training curves, pass@k curves and entropy heat maps
(`explore_jax.evaluation.plots`; --help lists the options)."""

from explore_jax.evaluation import plots

if __name__ == "__main__":
  plots.main()
