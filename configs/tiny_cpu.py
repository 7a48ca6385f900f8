"""GRPO with the entropy advantage on a tiny Qwen2 and the synthetic arithmetic task, on a laptop CPU.

    python -m explore_jax.train --config configs/tiny_cpu.py --workdir /tmp/tiny_cpu
    python -m explore_jax.train --config configs/tiny_cpu.py:variant=baseline --workdir /tmp/tiny_base
    python -m explore_jax.train --config configs/tiny_cpu.py:variant=ppo --workdir /tmp/tiny_ppo

The tiny "base model" is first pre-trained (SFT) on the synthetic task (worked solutions, and for
a share `pretrain.direct_answer_frac` of the problems the bare answer) and cached (see
`explore_jax/demo/pretrain.py`), then RL-trained through exactly the code path of the 7B configs.
It is the experiment of `configs/demo.py` (`defaults.tiny_config`), one variant at a time.
Variants: `entropy_adv` (default, the paper), `baseline` (plain GRPO), `entropy_reg` (the
-beta * H regularizer of the paper's Table 3), `ppo` (PPO + entropy advantage, alpha 0.1),
`ppo_baseline`, and the exploration suite's (docs/exploration_suite.md): `clip_cov`, `kl_cov`,
`top_entropy`, `passk`, `tis`, `dapo`. `:size=test` shrinks everything to a one-digit addition task and a 2-layer,
32-wide model, for the trainer's own tests.
"""

from explore_jax.config import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="entropy_adv", size="demo")
  c = common.tiny_config(args.size)
  c.rl.critic_warmup_steps = 2
  c.optim.critic_lr = 1e-3
  common.apply_variant(c, args.variant)
  return c
