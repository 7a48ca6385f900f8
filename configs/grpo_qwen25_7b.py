r"""GRPO on Qwen2.5-7B (base) with the entropy advantage: the paper's Table 2 setting.

    ./launch_tpu.sh run --config configs/grpo_qwen25_7b.py --workdir gs://BUCKET/grpo7b
    # or on one host:
    python -m explore_jax.train --config configs/grpo_qwen25_7b.py --workdir DIR \
        --config.model.path=/path/to/Qwen2.5-7B

Variants (same data, seeds and budget): `:variant=baseline` (plain GRPO), `:variant=entropy_reg`
(the -beta * H regularizer of Table 3), and the exploration suite at its papers' 7B settings
(docs/exploration_suite.md): `clip_cov`, `kl_cov`, `top_entropy`, `passk`, `tis`, `dapo`. Paper settings (Cheng et al., Table 4): AdamW lr 1e-6,
512 prompts x 8 samples per rollout, mini-batch 256 sequences (16 policy updates per rollout),
8K response tokens, temperature 1.0, clip 0.2 / 0.28, kappa 2, alpha 0.4, DAPO-Math-17k with the
DAPO prompt template and answer checker.
"""

from explore_jax.config import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="entropy_adv")
  c = common.base_config()
  common.paper_7b(c, "Qwen2.5-7B")
  c.data.template = "dapo"
  c.reward.method = "dapo"
  common.apply_variant(c, args.variant)
  return c
