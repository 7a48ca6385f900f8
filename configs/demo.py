r"""The main job: the paper's comparison at CPU scale (see explore_jax/demo.py).

    python -m explore_jax.demo --config configs/demo.py --workdir runs/demo          # one seed
    python -m explore_jax.demo --config configs/demo.py:seeds=3 --workdir runs/demo3

`size=test` is the shortened demo that tests/test_demo.py runs (seconds per step).

A tiny Qwen2 is pre-trained on arithmetic problems, 70% demonstrated by worked solutions and 30% by
the bare answer (the "base model"; `pretrain.direct_answer_frac`), then trained with GRPO
(baseline), GRPO + entropy advantage (the paper) and GRPO + entropy regularizer, with the same seeds
and budget; the base and the three are evaluated on the held-out split with pass@k up to 64.
"""

import ml_collections

from explore_jax import defaults as common
from explore_jax import evaluate


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, seeds=1, steps=25, problems=100, size="demo")
  test = args.size == "test"  # the shortened demo of tests/test_demo.py (tiny_config's test size)
  c = ml_collections.ConfigDict()
  c.train = common.tiny_config(args.size)
  c.train.total_steps = args.steps
  c.seeds = args.seeds
  c.variants = ("baseline", "entropy_adv", "entropy_reg")  # explore_jax.defaults.apply_variant
  c.eval = evaluate.base_config()
  c.eval.batch_size = 512
  c.eval.prompt_bucket = 8
  c.eval.reward_workers = c.train.reward.workers
  # The demo owns its eval dir: responses of a model since retrained (e.g. a longer budget) are
  # moved aside and sampled again.
  c.eval.on_changed_responses = "set_aside"
  c.eval.sampling.temperature = 0.6  # the paper's evaluation protocol
  c.eval.sampling.top_p = 0.95
  c.eval.sampling.max_new_tokens = c.train.rollout.max_new_tokens
  c.eval.synthetic = c.train.data.synthetic
  c.eval.benchmarks.heldout = evaluate.benchmark(
      "synthetic_arithmetic", 8 if test else 64, split="test", template="synthetic",
      max_problems=args.problems)
  c.base_model_dir = ""  # where the pre-trained base is cached; empty: WORKDIR/base_model
  c.heatmap_responses = 2 if test else 4  # responses per model coloured by token entropy
  return c
