r"""GRPO with the entropy advantage on a small Qwen2.5 from the hub, on one host: a first real run.

    python -m explore_jax.train --config configs/grpo_qwen25_small.py:model=0.5b --workdir DIR
    python -m explore_jax.train \
        --config configs/grpo_qwen25_small.py:model=math-1.5b,variant=baseline \
        --workdir DIR --config.total_steps=50
    # what it needs per device, before anything is downloaded or allocated:
    python -m explore_jax.train --config configs/grpo_qwen25_small.py:model=1.5b --workdir DIR \
        --config.dry_run=True --config.dry_run_chip=v5e

`model`: `0.5b` (Qwen/Qwen2.5-0.5B), `1.5b` (Qwen/Qwen2.5-1.5B) or `math-1.5b`
(Qwen/Qwen2.5-Math-1.5B); the weights and tokenizer come from the Hugging Face hub (cache:
$HF_HOME; offline: HF_HUB_OFFLINE=1 with the model cached), or set --config.model.path to a
directory. The mesh is (1, -1, 1): FSDP over whatever devices the host has (one GPU, a v5e-8,
or a CPU), so it fits without a flag. Variants as in the 7B configs: `entropy_adv` (default, the
paper), `baseline`, `entropy_reg`, `ppo`, `ppo_baseline`.

The paper's recipe (Cheng et al., Table 4: DAPO-Math-17k, the DAPO template and checker for base
models, lr 1e-6, temperature 1.0, clip 0.2 / 0.28, kappa 2, alpha 0.4) at one host's scale (ours):
64 prompts x 8 samples per step (the paper: 512 x 8), mini-batches of 128 sequences (4 policy
updates per step; the paper: 16), 256 decode slots. Responses: 8K tokens after a 1K prompt as in
the paper for Qwen2.5-0.5B / 1.5B (32K positions). Qwen2.5-Math-1.5B is trained to 4,096 positions
(rope_theta 1e4, max_position_embeddings 4096), which cannot hold 1K + 8K: its run caps the
response at 3,072 tokens after the 1,024-token prompt, as configs/grpo_qwen25_math_7b.py does, and
uses that model's own prompt (the Qwen2.5-Math suffix, graded by math-verify). The trainer refuses
a prompt + response budget beyond the model's positions.
"""

from explore_jax.config import defaults as common

MODELS = {"0.5b": "Qwen/Qwen2.5-0.5B", "1.5b": "Qwen/Qwen2.5-1.5B",
          "math-1.5b": "Qwen/Qwen2.5-Math-1.5B"}


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, model="0.5b", variant="entropy_adv")
  if args.model not in MODELS:
    raise ValueError(f"model={args.model!r}; known: {sorted(MODELS)}")
  c = common.base_config()
  c.total_steps = 200
  c.checkpoint_every = 10
  c.model.path = MODELS[args.model]
  c.model.param_dtype = "float32"  # master weights and AdamW states in float32
  c.model.dtype = "bfloat16"  # bf16 matmuls
  c.model.remat = True
  c.model.scan_layers = True
  c.data.name = "dapo_math_17k"
  c.data.prompts_per_step = 64
  c.data.max_prompt_len = 1024
  c.rollout.n = 8
  c.rollout.max_new_tokens = 8192
  c.rollout.slots = 256
  c.rl.mini_batch_size = 128
  c.rl.micro_batch_size = 0
  c.rl.micro_batch_per_shard = 1  # one 9K-token sequence per device per micro-step
  c.optim.lr = 1e-6
  c.mesh.shape = (1, -1, 1)
  if args.model == "math-1.5b":
    c.data.template = "qwen_math"
    c.reward.method = "math_verify"
    c.rollout.max_new_tokens = 3072  # + the 1024-token prompt = the model's 4096 positions
  else:
    c.data.template = "dapo"
    c.reward.method = "dapo"
  common.apply_variant(c, args.variant)
  return c
