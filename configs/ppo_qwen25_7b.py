r"""PPO on Qwen2.5-7B (base) with the entropy advantage (alpha 0.1): the paper's PPO rows.

    ./launch_tpu.sh run --config configs/ppo_qwen25_7b.py --workdir gs://BUCKET/ppo7b

Variants: `:variant=ppo_baseline` (plain PPO). The critic is the Qwen2.5 backbone plus a scalar
value head, initialised from the actor's backbone, trained with its own AdamW (lr 1e-5) and 10
critic-only warm-up rollouts; GAE with gamma = lambda = 1; value clip 0.5.
"""

from explore_jax import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="ppo")
  if not args.variant.startswith("ppo"):
    raise ValueError(f"variant={args.variant!r}: this config takes 'ppo' or 'ppo_baseline'")
  c = common.base_config()
  common.paper_7b(c, "Qwen2.5-7B")
  c.data.template = "dapo"
  c.reward.method = "dapo"
  c.rl.critic_warmup_steps = 10
  c.optim.critic_lr = 1e-5
  common.apply_variant(c, args.variant)
  return c
