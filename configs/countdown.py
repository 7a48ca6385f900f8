"""GRPO on the countdown testbed (issue 20): a task where the paper's entropy term can matter.

    python -m explore_jax.train --config configs/countdown.py --workdir /tmp/countdown
    python -m explore_jax.train --config configs/countdown.py:variant=placebo --workdir /tmp/cd_p

"Reach 21 with 3 5 7." The settings are `defaults.countdown_testbed`: the experiment of
configs/demo.py (`make demo`, `make study`), one variant at a time. Variants as in
configs/tiny_cpu.py (the exploration suite's included), plus `placebo` (psi = alpha * sg(H)
without its clip). `:size=test` is the trainer test's shortened run (tiny_config's test model
on two-number problems).
"""

from explore_jax.config import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="entropy_adv", size="demo")
  c = common.countdown_testbed(args.size)
  common.apply_variant(c, args.variant)
  return c
