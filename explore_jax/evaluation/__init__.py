"""Evaluation: benchmarks sampled and graded, the paper's analyses, paired comparisons, plots.

  evaluate  avg@n, unbiased pass@k, response length and repetition per benchmark and model
  analyze   the paper's entropy analyses (pivotal / fork tokens, reflective sentences, rare behaviours)
  compare   an arm against the baseline, paired by seed and problem
  plots     training curves, pass@k curves, entropy heat maps

`pass_at_k(n, c, k)` is the unbiased estimator of Chen et al. (2021).
"""

from explore_jax.evaluation.evaluate import pass_at_k

__all__ = ["pass_at_k"]
