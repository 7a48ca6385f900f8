"""GRPO on the countdown testbed (issue 20): a task where the paper's entropy term can matter.

    python -m explore_jax.train --config configs/countdown.py --workdir /tmp/countdown
    python -m explore_jax.train --config configs/countdown.py:variant=placebo --workdir /tmp/cd_p

"Reach 21 with 3 5 7." A tiny Qwen2 is pre-trained (SFT) on random attempts, `traces_per_problem`
per problem, a share `data.countdown.retry_frac` of them checking the value reached against the
target and retrying (explore_jax/data/countdown.py says why the task has the four properties the
effect needs), then RL-trained in the paper's update regime scaled down: groups of 16 samples,
4 mini-batch updates per rollout with clip 0.2 / 0.28, token-mean loss. Variants as in
configs/tiny_cpu.py, plus `placebo` (psi = alpha * sg(H) without its clip). `:size=test` is the
trainer test's shortened run (tiny_config's test model on 60 problems).

Pilot of the base model (issue 20; 1,500 pre-training steps, 113 s on 2 cores), on 200 held-out
problems with n = 128: pass@1 0.101 and pass@64 0.973 at temperature 0.6 / top-p 0.95; 0.088 and
0.969 at temperature 1. 2% of its responses retry, and they succeed less often than the rest
(0.069 against 0.089 at temperature 1): the retry behaviour is rare but does not yet pay.
"""

from explore_jax import defaults as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="entropy_adv", size="demo")
  c = common.tiny_config(args.size)
  c.data.name = "countdown"
  c.data.template = "countdown"
  c.reward.method = "countdown"
  c.rl.critic_warmup_steps = 2
  c.optim.critic_lr = 1e-3
  c.data.max_prompt_len = 16
  c.pretrain.seq_len = 160  # the longest traces (4 attempts) are about 150 tokens
  c.pretrain.length_buckets = 2  # 90% of the traces fit in 64 tokens
  if args.size == "test":
    c.data.countdown.update(train_size=60, test_size=5, retry_frac=0.5)
    c.pretrain.traces_per_problem = 2
    c.rollout.max_new_tokens = 40
    common.apply_variant(c, args.variant)
    return c
  c.pretrain.traces_per_problem = 8
  c.pretrain.steps = 1500
  c.pretrain.direct_answer_frac = 0.0
  c.rollout.max_new_tokens = 144  # room for a first attempt and 3 retries (about 136 tokens)
  c.rollout.n = 16  # at p = 0.05 groups of 8 carry no signal two times in three
  c.data.prompts_per_step = 32
  c.rl.mini_batch_size = 128  # 512 rows: 4 policy updates per rollout
  c.rl.micro_batch_size = 64
  common.apply_variant(c, args.variant)
  return c
