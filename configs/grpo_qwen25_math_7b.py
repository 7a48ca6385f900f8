r"""GRPO on Qwen2.5-Math-7B with the entropy advantage, Qwen2.5-Math prompt and math-verify.

    ./launch_tpu.sh run --config configs/grpo_qwen25_math_7b.py --workdir gs://BUCKET/math7b

Variants: `:variant=baseline`, `:variant=entropy_reg`. Qwen2.5-Math-7B has a 4096-token context
(rope_theta 1e4), so prompt + response are capped at 4096 here rather than the paper's 8K.
"""

from explore_jax import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="entropy_adv")
  c = common.base_config()
  c.total_steps = 500
  c.checkpoint_every = 10
  c.model.path = "Qwen2.5-Math-7B"
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.data.name = "dapo_math_17k"
  c.data.template = "qwen_math"
  c.data.max_prompt_len = 1024
  c.rollout.max_new_tokens = 3072
  c.reward.method = "math_verify"
  c.rl.mini_batch_size = 256
  c.rl.micro_batch_size = 64  # global; a multiple of data x fsdp (one sequence per chip on 64)
  c.rollout.prompts_per_wave = 64  # 512 rollout rows at once bound the KV cache
  c.optim.lr = 1e-6
  c.mesh.shape = (1, -1, 4)
  common.apply_variant(c, args.variant)
  return c
