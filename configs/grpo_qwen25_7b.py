r"""GRPO on Qwen2.5-7B (base) with the entropy advantage: the paper's Table 2 setting.

    ./launch_tpu.sh run --config configs/grpo_qwen25_7b.py --workdir gs://BUCKET/grpo7b
    # or on one host:
    python -m explore_jax.train --config configs/grpo_qwen25_7b.py --workdir DIR \
        --config.model.path=/path/to/Qwen2.5-7B

Variants (same data, seeds and budget): `:variant=baseline` (plain GRPO), `:variant=entropy_reg`
(the -beta * H regularizer of Table 3). Paper settings (Cheng et al., Table 4): AdamW lr 1e-6,
512 prompts x 8 samples per rollout, mini-batch 256 sequences (16 policy updates per rollout),
8K response tokens, temperature 1.0, clip 0.2 / 0.28, kappa 2, alpha 0.4, DAPO-Math-17k with the
DAPO prompt template and answer checker.
"""

from explore_jax import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="entropy_adv")
  c = common.base_config()
  c.total_steps = 500
  c.checkpoint_every = 10
  c.model.path = "Qwen2.5-7B"  # a local HF directory of the released checkpoint
  c.model.param_dtype = "float32"  # master weights and AdamW states in float32
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.data.name = "dapo_math_17k"
  c.data.template = "dapo"
  c.data.prompts_per_step = 512
  c.data.max_prompt_len = 1024
  c.rollout.n = 8
  c.rollout.max_new_tokens = 8192
  c.rollout.temperature = 1.0
  c.reward.method = "dapo"
  c.rl.mini_batch_size = 256
  c.rl.micro_batch_size = 64  # global; a multiple of data x fsdp (one sequence per chip on 64)
  c.rollout.prompts_per_wave = 64  # 512 rollout rows at once bound the KV cache
  c.optim.lr = 1e-6
  c.mesh.shape = (1, -1, 4)  # FSDP over the slice, 4-way tensor parallelism (4 kv heads)
  common.apply_variant(c, args.variant)
  return c
