"""Every configuration key of a training run, with its default, in one place.

`configs/*.py` start from `base_config()` and override what their experiment changes, so the config
file is the record of the experiment and code never needs `config.get(key, default)`. Defaults are the
paper's settings (Cheng et al., Table 4) unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import types

import ml_collections

from explore_jax.data import countdown

VARIANTS = ("entropy_adv", "baseline", "entropy_reg", "ppo", "ppo_baseline", "placebo")


def parse_arg(arg: str | None, **defaults) -> types.SimpleNamespace:
  """`"variant=baseline,seeds=3"` -> namespace; unknown keys fail loudly."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in out:
      raise ValueError(f"config argument {key!r} unknown; known: {sorted(out)}")
    out[key] = type(out[key])(value) if out[key] is not None else value
  return types.SimpleNamespace(**out)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 500  # rollouts (each followed by its policy updates)
  c.checkpoint_every = 20
  # Also save when this many minutes passed since the last save (process 0's clock; 0: off). On
  # preemptible TPUs this, not the ~30 s SIGTERM notice, bounds the work lost.
  c.checkpoint_every_minutes = 0.0
  c.keep_checkpoints = 3
  c.log_every = 1
  c.on_nonfinite = "raise"  # "raise": stop naming step and quantity; "skip": drop that update
  c.dry_run = False  # build the state from shapes on the mesh, print per-device memory, exit
  # The chip (explore_jax.tpu.memory.HBM_BYTES: v4, v5e, v5p, v6e) whose HBM the dry run checks its
  # estimate against when the devices report no memory size (a CPU mesh standing in for a
  # slice); exits 1 when the estimate does not fit. Empty: the device's own figure.
  c.dry_run_chip = ""
  c.progress_bar = True
  c.export_hf = True  # at the end, write the actor to WORKDIR/hf (local or gs://) in HF format

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # HF or orbax directory, local or gs://; empty = random init (+ pretrain SFT)
  c.model.tokenizer = ""  # tokenizer directory; empty = model.path (or the tiny tokenizer)
  # Where each host copies a gs:// model.path / model.tokenizer before loading it (once: a
  # complete copy is reused); empty = models/ in the cache dir (explore_jax/paths.py).
  c.model.stage_dir = ""
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.model.remat = False
  # Attention of the training forward (explore_jax/models/attention.py): "auto" picks splash on
  # TPU (head dim a multiple of 128), cuDNN on a GPU in bf16/fp16, else dense up to 128 positions
  # and blockwise (flash, memory linear in length, faster on CPU) beyond; or "dense", "blockwise", "splash",
  # "cudnn". The sampler's cached decode is dense whatever this says.
  c.model.attention = "auto"
  # One nn.scan over the decoder layers (parameters stacked on a leading layer axis; compiles one
  # layer instead of L). A checkpoint keeps the layout it was written with: restoring it under the
  # other layout is an error (convert it with `python -m explore_jax.convert restack`).
  c.model.scan_layers = False
  # What a rematerialised layer saves: "none", "full", "projections" (the q/k/v/o and MLP
  # projection outputs); "" = model.remat decides (True: "full", False: "none").
  c.model.remat_policy = ""
  # Architecture of a randomly initialised model (ignored when model.path is set).
  c.model.hidden_size = 128
  c.model.intermediate_size = 384
  c.model.num_hidden_layers = 4
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2
  c.model.rope_theta = 10000.0
  c.model.tie_word_embeddings = True

  # Supervised pre-training of a random model on the synthetic task (the CPU "base model").
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 0
  c.pretrain.batch_size = 64
  c.pretrain.lr = 3e-3
  c.pretrain.seq_len = 96
  c.pretrain.seed = 0  # the base model is shared by every RL seed of an experiment
  # Share of problems whose demonstration is the bare boxed answer, no worked steps.
  c.pretrain.direct_answer_frac = 0.0
  c.pretrain.traces_per_problem = 1  # countdown: random attempts shown per problem
  c.pretrain.length_buckets = 1  # 2: short rows in batches of their own length (pretrain.py)

  c.data = ml_collections.ConfigDict()
  c.data.name = "dapo_math_17k"
  c.data.split = "train"
  c.data.data_dir = ""  # empty: ../shared/data next to the checkout (explore_jax.paths)
  c.data.template = "dapo"  # see explore_jax.data.templates
  c.data.prompts_per_step = 512
  c.data.max_prompt_len = 1024
  # Difficulty of the synthetic_arithmetic task (explore_jax.data.synthetic.ArithmeticConfig).
  c.data.synthetic = ml_collections.ConfigDict(dict(
      min_operands=2, max_operands=4, max_number=19, max_value=999, ops="+-*", train_size=20000,
      test_size=500))
  # The countdown task (explore_jax.data.countdown.CountdownConfig).
  c.data.countdown = countdown_config()

  c.rollout = ml_collections.ConfigDict()
  c.rollout.n = 8  # samples per prompt (the GRPO group)
  c.rollout.max_new_tokens = 8192
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.rollout.prompts_per_wave = 0  # static engine: prompts sampled at once; 0 = all of a step
  # "continuous": `slots` decode slots, each refilled as soon as its row ends
  # (explore_jax.rollout.engine; the KV cache is slots x (max_prompt_len + max_new_tokens));
  # "paged": up to `slots` rows at once over a pool of `kv_pages` KV pages that rows take as they
  # grow (explore_jax.rollout.paged; the KV cache is kv_pages x page_size positions);
  # "static": all rows of a wave decode until the last one ends (explore_jax.rollout.sampling).
  c.rollout.engine = "continuous"
  # Rows decoded at once (continuous: the KV-cache memory bound); 0 = all rows of a step.
  c.rollout.slots = 0
  # continuous: decode steps a device call's cache read is sized for (the call runs on while its
  # rows fit that read, until refill_share of the slots is free), and the most steps a free slot
  # waits for its refill
  c.rollout.chunk = 16
  # continuous: decode attention reads each row's filled blocks of this many slots
  # (explore_jax/models/decode_attention.py); 0 = every slot up to the longest row in flight
  c.rollout.kv_block = 64
  # continuous: a chunk ends early once this share of the slots is free while rows are pending
  c.rollout.refill_share = 0.25
  # paged: pages in the KV pool (0 = room for every slot's full row: never preempts), positions
  # per page, pages per block of the Pallas kernels' reads, and the page attention ("auto": the
  # Pallas kernel on TPU, a pure-JAX gather elsewhere; "gather", "pallas_tpu", "pallas_gpu")
  c.rollout.kv_pages = 0
  c.rollout.page_size = 16
  c.rollout.page_block = 2
  c.rollout.page_attention = "auto"

  c.reward = ml_collections.ConfigDict()
  c.reward.method = "dapo"  # "dapo" | "math_verify"
  c.reward.correct = 1.0
  c.reward.incorrect = -1.0
  c.reward.timeout_s = 5.0
  c.reward.workers = 8

  c.rl = ml_collections.ConfigDict()
  c.rl.algorithm = "grpo"  # "grpo" | "ppo"
  c.rl.entropy_advantage = True  # the paper's psi term
  c.rl.alpha = 0.4
  c.rl.kappa = 2.0
  # psi's clip at |A| / kappa; False is a placebo arm, psi = alpha * sg(H) on every token: the
  # same positive offset, whose expected gradient is 0 (H depends on the prefix only), without
  # the clip that makes the paper's term reweight correct and incorrect responses differently.
  c.rl.entropy_clip = True
  c.rl.entropy_coef = 0.0  # beta of the entropy regularizer -beta * H (Table 3 baseline)
  c.rl.kl_coef = 0.0
  c.rl.kl_kind = "k3"
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.28
  c.rl.clip_c = 0.0  # dual-clip constant for A < 0; 0 = off (the paper's optional value is 3)
  c.rl.agg = "token-mean"
  c.rl.norm_by_std = True
  c.rl.gamma = 1.0
  c.rl.lam = 1.0
  c.rl.whiten_advantages = True  # PPO: masked whitening of GAE advantages
  c.rl.value_clip = 0.5
  c.rl.epochs = 1  # passes over each rollout; updates per rollout = epochs * rollouts / mini_batch
  c.rl.mini_batch_size = 256  # sequences per policy update
  # Sequences per forward/backward (gradient accumulation), set by exactly one of two keys:
  # micro_batch_size counts the whole mesh's sequences (it must split evenly over the data x fsdp
  # batch shards); micro_batch_per_shard counts one batch shard's, so the global micro-batch is
  # micro_batch_per_shard x data x fsdp. The other must be 0.
  c.rl.micro_batch_size = 32
  c.rl.micro_batch_per_shard = 0
  c.rl.critic_warmup_steps = 10  # PPO: critic-only rollouts before policy updates start
  c.rl.logit_chunk = 1024  # tokens per chunk when projecting hidden states to the vocabulary
  # Static row lengths (evenly spaced up to prompt + response) a micro-batch is cut to after
  # sorting rows by length: skips padding, same result. 1 = off; each length is one compiled
  # branch of the update (compile time grows with it).
  c.rl.length_buckets = 1

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6
  c.optim.critic_lr = 1e-5
  c.optim.warmup_steps = 0  # optimizer updates of linear warm-up
  c.optim.schedule = "constant"  # "constant" | "cosine"
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.max_grad_norm = 1.0

  c.mesh = mesh_config((1, -1, 1))
  c.distributed = distributed_config()
  return c


def mesh_config(shape: tuple[int, int, int]) -> ml_collections.ConfigDict:
  """The device mesh of a job (the trainer's and the evaluator's)."""
  return ml_collections.ConfigDict(dict(
      shape=shape,  # (data, fsdp, tensor); -1 takes the remaining devices
      rules=(),  # extra (logical, mesh axes) rules, taking precedence over the defaults
  ))


def distributed_config() -> ml_collections.ConfigDict:
  """Multi-controller start-up (`explore_jax.tpu.sharding.initialize_distributed`)."""
  return ml_collections.ConfigDict(dict(
      coordinator="",  # host:port; "auto": TPU-pod detection; empty: single process
      num_processes=1,
      process_id=0,
      cpu_collectives="",  # "gloo" to run several CPU processes on one machine
  ))


def countdown_config() -> ml_collections.ConfigDict:
  """The fields of `data.countdown.CountdownConfig`, at their defaults."""
  return ml_collections.ConfigDict(dataclasses.asdict(countdown.CountdownConfig()))


def tiny_config(size: str = "demo") -> ml_collections.ConfigDict:
  """The CPU-scale experiment (configs/tiny_cpu.py, configs/demo.py): a 2-layer Qwen2 pre-trained on
  the synthetic task, then GRPO on it; a few minutes on 2 cores. size="test" shrinks it to seconds
  per step (a 32-wide model on one-digit additions) for the project's own tests."""
  if size not in ("demo", "test"):
    raise ValueError(f"size={size!r}: use 'demo' or 'test'")
  c = base_config()
  c.total_steps = 25
  c.checkpoint_every = 5
  c.progress_bar = True

  c.model.hidden_size = 64
  c.model.intermediate_size = 192
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2
  c.model.rope_theta = 10000.0
  c.model.tie_word_embeddings = True

  c.pretrain.steps = 800
  c.pretrain.batch_size = 64
  c.pretrain.seq_len = 64
  c.pretrain.lr = 3e-3
  # 30% of the problems are demonstrated by their bare answer, so the base model sometimes
  # answers without working (about 1 sample in 6 at temperature 0.6), and then is right half as
  # often as with its worked steps: a behaviour that RL can change with the outcome reward alone.
  c.pretrain.direct_answer_frac = 0.3

  c.data.name = "synthetic_arithmetic"
  c.data.template = "synthetic"
  # Additions and subtractions of 2-3 one-digit numbers.
  c.data.synthetic.update(dict(min_operands=2, max_operands=3, max_number=9, ops="+-",
                               train_size=2000, test_size=100))
  c.data.prompts_per_step = 64
  c.data.max_prompt_len = 24
  c.rollout.n = 8
  c.rollout.max_new_tokens = 48
  c.reward.method = "math_verify"
  c.reward.workers = 2
  # 512 rollouts -> 2 policy updates of 32 prompts x 8 per step (README: with 4 prompts per
  # update, an Adam step is mostly noise).
  c.rl.mini_batch_size = 256
  c.rl.micro_batch_size = 64
  c.rl.logit_chunk = 64
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 4
  if size == "test":
    _shrink_for_tests(c)
  return c


def countdown_testbed(size: str = "demo") -> ml_collections.ConfigDict:
  """The countdown testbed (configs/countdown.py; configs/demo.py, whose plan=study is the full
  comparison): the tiny model pre-trained (SFT) on random countdown attempts,
  `traces_per_problem` per problem, a share `data.countdown.retry_frac` of them checking and
  retrying (explore_jax/data/countdown.py says why the task has the four properties the paper's
  effect needs), then RL in the paper's update regime scaled down: groups of 16 samples, 4
  mini-batch updates per rollout with clip 0.2 / 0.28, token-mean loss. size="test": the tests'
  model on two-number problems."""
  c = tiny_config(size)
  c.data.name = "countdown"
  c.data.template = "countdown"
  c.reward.method = "countdown"
  c.rl.critic_warmup_steps = 2
  c.optim.critic_lr = 1e-3
  c.data.max_prompt_len = 16
  c.pretrain.seq_len = 160  # the longest traces (4 attempts) are about 150 tokens
  c.pretrain.length_buckets = 2  # 90% of the traces fit in 64 tokens
  if size == "test":
    # Two numbers: the tests' 32-wide model learns the format in 300 steps, but solves a held-out
    # problem only on some CPUs (avg@8 0.0 at 300 steps, 0.025 at 500, 0.20 at 800 on one; the
    # demo test needs 0 < avg@8 < 1).
    c.data.countdown.update(num_numbers=2, max_solve_rate=0.5, train_size=60, test_size=5,
                            retry_frac=0.5)
    c.pretrain.steps = 800
    c.pretrain.traces_per_problem = 2
    c.pretrain.seq_len = 96  # two numbers: a trace of 4 attempts is about 80 tokens
    c.rollout.max_new_tokens = 40
    return c
  c.total_steps = 40
  c.checkpoint_every = 10
  c.pretrain.traces_per_problem = 8
  c.pretrain.steps = 1500
  c.pretrain.direct_answer_frac = 0.0
  c.rollout.max_new_tokens = 144  # room for a first attempt and 3 retries (about 136 tokens)
  c.rollout.n = 16  # at p = 0.05 groups of 8 carry no signal two times in three
  # The view read, as when the study in docs/study was run (a ragged read changes float rounding).
  c.rollout.kv_block = 0
  c.data.prompts_per_step = 32
  c.rl.mini_batch_size = 128  # 512 rows: 4 policy updates per rollout
  c.rl.micro_batch_size = 64
  return c


def _shrink_for_tests(c: ml_collections.ConfigDict) -> None:
  c.total_steps = 4
  c.checkpoint_every = 2
  c.progress_bar = False
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.pretrain.steps = 300
  c.pretrain.lr = 1e-2
  c.pretrain.direct_answer_frac = 0.0  # one-digit sums: a bare answer is as easy as a step
  c.pretrain.batch_size = 32
  c.pretrain.seq_len = 32
  c.data.synthetic.update(dict(min_operands=2, max_operands=2, max_number=9, ops="+",
                               train_size=60, test_size=5))
  c.data.prompts_per_step = 4
  c.data.max_prompt_len = 16
  c.rollout.n = 4
  c.rollout.max_new_tokens = 24
  c.rollout.slots = 8  # 16 rows through 8 slots: the engine refills
  c.rollout.chunk = 4
  c.rl.mini_batch_size = 8
  c.rl.micro_batch_size = 4
  c.rl.logit_chunk = 8
  c.reward.workers = 1
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2


def paper_7b(c: ml_collections.ConfigDict, model_path: str) -> None:
  """Settings shared by the 7B configs on a TPU pod slice. Sources: "Table 4" is Cheng et al.,
  arXiv 2506.14758, Appendix B, Table 4; "ours" is a choice of this project (memory, bookkeeping).

  From base_config, also Table 4: 512 prompts x 8 samples per rollout (data.prompts_per_step,
  rollout.n), 8K response tokens (rollout.max_new_tokens = 8192), rollout temperature 1.0,
  clip 0.2 / 0.28 (clip-higher); kappa 2 and alpha 0.4 (GRPO) / 0.1 (PPO, apply_variant) are the
  paper's published settings (DESIGN.md section 1). AdamW weight decay 0.01, grad-norm clip
  1.0: ours.
  """
  c.total_steps = 500  # ours: rollouts to run; the paper gives curves, not a step count here
  c.checkpoint_every = 10  # ours
  c.model.path = model_path  # a local HF directory of the released checkpoint (or its name,
  # which the dry run and explore_jax.aot read as the preset of the same name)
  c.model.param_dtype = "float32"  # ours: master weights and AdamW states in float32
  c.model.dtype = "bfloat16"  # ours: bf16 matmuls
  c.model.remat = True  # ours: 9K-token sequences need every layer recomputed (memory plan)
  # ours: one compiled layer under nn.scan (explore_jax.aot: the GRPO step's programs compile in
  # about a third of the time; docs/memory_plan.md)
  c.model.scan_layers = True
  c.data.name = "dapo_math_17k"  # the paper's training data (DESIGN.md section 2)
  # Table 4: mini-batch 32 prompts = 32 x 8 = 256 sequences, so 512 / 32 = 16 policy updates per
  # rollout (rl.epochs = 1).
  c.rl.mini_batch_size = 256
  # Ours: one 9K-token sequence per batch shard per micro-step (docs/memory_plan.md), so the
  # global micro-batch is data x fsdp sequences on any slice; 256 must be a multiple of it.
  c.rl.micro_batch_size = 0
  c.rl.micro_batch_per_shard = 1
  c.rollout.prompts_per_wave = 64  # ours, static engine: 512 rollout rows at once bound the KV cache
  # Ours, the paged engine (docs/paged_rollouts.md): 1024 rows decode at once over a pool of the
  # bytes of 512 full rows (512 x 9216 positions, 73728 pages of 64), which is what the
  # continuous engine's 512 slots took. At the paper's lengths (median response a quarter of the
  # cap) the pool peaks at 73% in use (explore_jax.aot's page_pool): twice the rows of the
  # contiguous cache, with a quarter of the pool to spare. (rollout.engine=continuous takes
  # rollout.slots=512 for the same bytes.)
  c.rollout.engine = "paged"
  c.rollout.slots = 1024
  c.rollout.kv_pages = 73728
  c.rollout.page_size = 64
  c.rollout.page_block = 4  # blocks of 256 positions for the Pallas TPU kernel
  c.rollout.chunk = 32
  c.optim.lr = 1e-6  # Table 4: policy learning rate
  c.mesh.shape = (1, -1, 4)  # ours: FSDP over the slice, 4-way tensor parallelism (4 kv heads)


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> None:
  """The paper's comparisons: the same experiment with and without the entropy term."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}; known: {VARIANTS}")
  if variant.startswith("ppo"):
    c.rl.algorithm = "ppo"
    c.rl.alpha = 0.1
  c.rl.entropy_advantage = variant in ("entropy_adv", "ppo", "placebo")
  c.rl.entropy_clip = variant != "placebo"
  if variant == "entropy_reg":
    c.rl.entropy_coef = 0.001
