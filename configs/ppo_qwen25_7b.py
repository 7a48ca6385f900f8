r"""PPO on Qwen2.5-7B (base) with the entropy advantage (alpha 0.1): the paper's PPO rows.

    ./launch_tpu.sh run --config configs/ppo_qwen25_7b.py --workdir gs://BUCKET/ppo7b

Variants: `:variant=ppo_baseline` (plain PPO). The critic is the Qwen2.5 backbone plus a scalar
value head, initialised from the actor's backbone, trained with its own AdamW and 10 critic-only
warm-up rollouts; GAE with gamma = lambda = 1; value clip 0.5. Sources: Cheng et al., arXiv
2506.14758, Appendix B ("For PPO only, the critic is trained with a learning rate of 2e-6, with a
10-step pre-training applied before initiating policy updates"); the shared settings and where
each comes from are in `explore_jax.config.defaults.paper_7b`.
"""

from explore_jax.config import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="ppo")
  if not args.variant.startswith("ppo"):
    raise ValueError(f"variant={args.variant!r}: this config takes 'ppo' or 'ppo_baseline'")
  c = common.base_config()
  common.paper_7b(c, "Qwen2.5-7B")
  c.data.template = "dapo"
  c.reward.method = "dapo"
  c.rl.critic_warmup_steps = 10  # Appendix B: 10-step critic pre-training
  c.optim.critic_lr = 2e-6  # Appendix B: the critic's learning rate
  # GAE gamma = lambda = 1 and value clip 0.5 (rl.gamma, rl.lam, rl.value_clip, base_config):
  # the PPO baseline of DESIGN.md section 1, not numbers Table 4 gives.
  common.apply_variant(c, args.variant)
  return c
