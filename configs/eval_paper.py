"""The paper's evaluation protocol (Cheng et al.): temperature 0.6, top-p 0.95, 8K tokens.

    python -m explore_jax.evaluate --config configs/eval_paper.py --config.model=/ckpt/dir \
        --workdir /tmp/eval_paper
    # base vs RL models in one pass@k plot:
    python -m explore_jax.evaluate --config configs/eval_paper.py \
        --config.models="('/ckpt/base', '/ckpt/grpo', '/ckpt/grpo_entropy')" --workdir /tmp/eval
    # one TPU host of 4 chips (16-32 GB each): 4-way tensor parallelism; on a pod slice the same
    # arguments go through launch_tpu.sh evaluate, which runs it on every worker
    python -m explore_jax.evaluate --config configs/eval_paper.py --config.model=/ckpt/dir \
        --config.mesh.shape="(-1,1,4)" --workdir /tmp/eval_paper
    # a quick look: the Qwen2.5-7B base DAPO template, fewer samples
    python -m explore_jax.evaluate --config configs/eval_paper.py:template=dapo \
        --config.model=/ckpt/dir --config.benchmarks.aime24.n=32 --workdir /tmp/eval_quick

n = 256 (AIME 2024, AIME 2025), 128 (AMC 2023), 16 (MATH500) as in the paper's pass@k figures; GSM8K
(not in the paper) gets n = 16. The template follows the model: "qwen_math" (Qwen2.5-Math-7B, graded
by math-verify) or "dapo" (Qwen2.5-7B base, DAPO template and answer checker).

Memory of a 7B model in bf16 at 64 decode slots: 15 GB of weights and ~31 GB of KV cache (64 rows x
8.4K slots x 57 KB). With 4-way tensor parallelism (Qwen2.5-7B has 4 kv heads) both are split in
four, ~12 GB a chip.
"""

from explore_jax.config import defaults as common
from explore_jax.evaluation import evaluate


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, template="qwen_math")
  reward = "dapo" if args.template == "dapo" else "math_verify"
  c = evaluate.base_config()
  c.dtype = "bfloat16"
  # 64 decode slots fit one 80 GB GPU, or 4 TPU chips with tensor parallelism (memory: above);
  # each call pushes 512 rows (2 problems at n = 256) through them, refilling slots as rows end.
  c.batch_size = 512
  c.slots = 64
  c.sampling.temperature = 0.6
  c.sampling.top_p = 0.95
  c.sampling.max_new_tokens = 8192
  for name, n in (("aime24", 256), ("aime25", 256), ("amc23", 128), ("math500", 16),
                  ("gsm8k", 16)):
    c.benchmarks[name] = evaluate.benchmark(name, n, template=args.template, reward_method=reward)
  return c
