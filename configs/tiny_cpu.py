"""GRPO with the entropy advantage on a tiny Qwen2 and the synthetic arithmetic task, on a laptop CPU.

    python -m explore_jax.train --config configs/tiny_cpu.py --workdir /tmp/tiny_cpu
    python -m explore_jax.train --config configs/tiny_cpu.py:variant=baseline --workdir /tmp/tiny_base
    python -m explore_jax.train --config configs/tiny_cpu.py:variant=ppo --workdir /tmp/tiny_ppo

The tiny "base model" is first pre-trained (SFT) on worked solutions of the synthetic task and cached
(see `explore_jax/pretrain.py`), then RL-trained through exactly the code path of the 7B configs.
It is the experiment of `configs/demo.py` (`defaults.tiny_config`), one variant at a time.
Variants: `entropy_adv` (default, the paper), `baseline` (plain GRPO), `entropy_reg` (the
-beta * H regularizer of the paper's Table 3), `ppo` (PPO + entropy advantage, alpha 0.1),
`ppo_baseline`. `:size=test` shrinks everything to a one-digit addition task and a 2-layer,
32-wide model, for the trainer's own tests.
"""

from explore_jax import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="entropy_adv", size="demo")
  c = common.tiny_config()
  c.rl.critic_warmup_steps = 2
  c.optim.critic_lr = 1e-3
  if args.size == "test":  # seconds per step: the trainer's own tests
    shrink_for_tests(c)
  elif args.size != "demo":
    raise ValueError(f"size={args.size!r}: use 'demo' or 'test'")
  common.apply_variant(c, args.variant)
  return c


def shrink_for_tests(c):
  c.total_steps = 4
  c.checkpoint_every = 2
  c.progress_bar = False
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.pretrain.steps = 300
  c.pretrain.lr = 1e-2
  c.pretrain.batch_size = 32
  c.pretrain.seq_len = 32
  c.data.synthetic.update(dict(min_operands=2, max_operands=2, max_number=9, ops="+",
                               train_size=60, test_size=5))
  c.data.prompts_per_step = 4
  c.data.max_prompt_len = 16
  c.rollout.n = 4
  c.rollout.max_new_tokens = 24
  c.rl.mini_batch_size = 8
  c.rl.micro_batch_size = 4
  c.rl.logit_chunk = 8
  c.reward.workers = 1
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
