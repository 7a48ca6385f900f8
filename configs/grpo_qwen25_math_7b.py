r"""GRPO on Qwen2.5-Math-7B with the entropy advantage, Qwen2.5-Math prompt and math-verify.

    ./launch_tpu.sh run --config configs/grpo_qwen25_math_7b.py --workdir gs://BUCKET/math7b

Variants: `:variant=baseline`, `:variant=entropy_reg`. Qwen2.5-Math-7B has a 4096-token context
(rope_theta 1e4), so prompt + response are capped at 4096 here rather than the paper's 8K.
"""

from explore_jax.config import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="entropy_adv")
  c = common.base_config()
  common.paper_7b(c, "Qwen2.5-Math-7B")
  c.data.template = "qwen_math"
  c.reward.method = "math_verify"
  c.rollout.max_new_tokens = 3072  # + a 1024-token prompt fill the 4096-token context
  common.apply_variant(c, args.variant)
  return c
