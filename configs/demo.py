r"""The main job: the paper's comparison at CPU scale (see explore_jax/demo.py).

    python -m explore_jax.demo --config configs/demo.py --workdir runs/demo          # one seed
    python -m explore_jax.demo --config configs/demo.py:seeds=3,steps=60 --workdir runs/demo3

A tiny Qwen2 is pre-trained on worked arithmetic solutions (the "base model"), then trained with
GRPO (baseline), GRPO + entropy advantage (the paper) and GRPO + entropy regularizer, with the same
seeds and budget; the base and the three are evaluated on the held-out split with pass@k up to 64.
"""

import ml_collections

from explore_jax import defaults as common
from explore_jax import evaluate


def train_config() -> ml_collections.ConfigDict:
  """The RL run every variant shares; `demo.variants` changes only the entropy term."""
  c = common.base_config()
  c.total_steps = 30
  c.checkpoint_every = 10
  c.export_hf = True
  c.progress_bar = True

  c.model.hidden_size = 64
  c.model.intermediate_size = 192
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2
  c.model.rope_theta = 10000.0
  c.model.tie_word_embeddings = True

  c.pretrain.steps = 500
  c.pretrain.batch_size = 64
  c.pretrain.seq_len = 64
  c.pretrain.lr = 3e-3

  c.data.name = "synthetic_arithmetic"
  c.data.template = "synthetic"
  # Additions and subtractions of 2-3 one-digit numbers: the pre-trained base solves about half of
  # the held-out problems greedily, so RL has signal in most groups of 8.
  c.data.synthetic.update(dict(min_operands=2, max_operands=3, max_number=9, ops="+-",
                               train_size=2000, test_size=100))
  c.data.prompts_per_step = 16
  c.data.max_prompt_len = 24
  c.rollout.n = 8
  c.rollout.max_new_tokens = 48
  c.reward.method = "math_verify"
  c.reward.workers = 2
  c.rl.mini_batch_size = 32  # 128 rollouts -> 4 policy updates per step
  c.rl.micro_batch_size = 32
  c.rl.logit_chunk = 64
  # Adam's first steps move every weight by about lr; above ~3e-4 one rollout's updates already
  # cost this tiny model most of its accuracy (measured), so RL here is slow and careful.
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 4
  return c


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, seeds=1, steps=30, problems=100)
  c = ml_collections.ConfigDict()
  c.train = train_config()
  c.train.total_steps = args.steps
  c.seeds = args.seeds
  c.variants = ("baseline", "entropy_adv", "entropy_reg")  # explore_jax.defaults.apply_variant
  c.eval = evaluate.base_config()
  c.eval.batch_size = 512
  c.eval.prompt_bucket = 8
  c.eval.reward_workers = 2
  c.eval.sampling.temperature = 0.6  # the paper's evaluation protocol
  c.eval.sampling.top_p = 0.95
  c.eval.sampling.max_new_tokens = c.train.rollout.max_new_tokens
  c.eval.synthetic = c.train.data.synthetic
  c.eval.benchmarks.heldout = evaluate.benchmark(
      "synthetic_arithmetic", 64, split="test", template="synthetic", max_problems=args.problems)
  c.base_model_dir = ""  # where the pre-trained base is cached; empty: WORKDIR/base_model
  c.heatmap_responses = 4  # responses of each model coloured by token entropy in the report
  return c
