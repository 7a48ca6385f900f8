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
# The exploration suite (docs/exploration_suite.md): GRPO with one of the methods the paper is
# compared with, in place of the entropy advantage.
SUITE_VARIANTS = ("clip_cov", "kl_cov", "top_entropy", "passk", "tis", "dapo")


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
  """Every key of a training run with its default: the run's own keys, then one section each."""
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
  # The export's weight dtype ("float32", "bfloat16", "float16"); empty: the dtype model.path's
  # weights are stored in (its config.json's torch_dtype), so a bf16 model is exported in bf16.
  c.export_dtype = ""
  c.model = model_config()
  c.pretrain = pretrain_config()
  c.data = data_config()
  c.rollout = rollout_config()
  c.reward = reward_config()
  c.rl = rl_config()
  c.optim = optim_config()
  c.mesh = mesh_config((1, -1, 1))
  c.distributed = distributed_config()
  return c


def model_config() -> ml_collections.ConfigDict:
  """The model: where its files are, its dtypes and memory layout, and a random model's shape."""
  model = ml_collections.ConfigDict()
  # HF or orbax directory (local or gs://), or a Hugging Face hub id ORG/NAME[@REV] (fetched
  # into the hub cache: explore_jax.models.hub); empty = random init (+ pretrain SFT)
  model.path = ""
  # A Hugging Face tokenizer: directory, gs:// or hub id; empty = model.path's (or the tiny one)
  model.tokenizer = ""
  # Where each host copies a gs:// model.path / model.tokenizer before loading it (once: a
  # complete copy is reused); empty = models/ in the cache dir (explore_jax/paths.py).
  model.stage_dir = ""
  model.param_dtype = "float32"
  model.dtype = "float32"
  model.remat = False
  # Attention of the training forward (explore_jax/models/attention.py): "auto" picks splash on
  # TPU (head dim a multiple of 128), cuDNN on a GPU in bf16/fp16, else dense up to 128 positions
  # and blockwise (flash, memory linear in length, faster on CPU) beyond; or "dense", "blockwise", "splash",
  # "cudnn". The sampler's cached decode is dense whatever this says.
  model.attention = "auto"
  # One nn.scan over the decoder layers (parameters stacked on a leading layer axis; compiles one
  # layer instead of L). A checkpoint keeps the layout it was written with: restoring it under the
  # other layout is an error (convert it with `python -m explore_jax.convert restack`).
  model.scan_layers = False
  # What a rematerialised layer saves: "none", "full", "projections" (the q/k/v/o and MLP
  # projection outputs); "" = model.remat decides (True: "full", False: "none").
  model.remat_policy = ""
  # Architecture of a randomly initialised model (ignored when model.path is set).
  model.hidden_size = 128
  model.intermediate_size = 384
  model.num_hidden_layers = 4
  model.num_attention_heads = 4
  model.num_key_value_heads = 2
  model.rope_theta = 10000.0
  model.tie_word_embeddings = True
  return model


def pretrain_config() -> ml_collections.ConfigDict:
  """Supervised pre-training of a random model on a generated task (the CPU "base model")."""
  pretrain = ml_collections.ConfigDict()
  # Supervised pre-training of a random model on the synthetic task (the CPU "base model").
  pretrain.steps = 0
  pretrain.batch_size = 64
  pretrain.lr = 3e-3
  pretrain.seq_len = 96
  pretrain.seed = 0  # the base model is shared by every RL seed of an experiment
  # Share of problems whose demonstration is the bare boxed answer, no worked steps.
  pretrain.direct_answer_frac = 0.0
  pretrain.traces_per_problem = 1  # countdown: random attempts shown per problem
  pretrain.length_buckets = 1  # 2: short rows in batches of their own length (pretrain.py)
  return pretrain


def data_config() -> ml_collections.ConfigDict:
  """The prompts: dataset, template, how many per step and how long."""
  data = ml_collections.ConfigDict()
  # A name of explore_jax.data.NAMES, a JSONL / JSON / parquet file, or a hub dataset
  # "hf:ORG/NAME[@REV][:PATH]" (its file for `split`; explore_jax.data.load)
  data.name = "dapo_math_17k"
  data.split = "train"
  # A file's or hub dataset's fields (dotted paths into a record; a problem field holding a chat
  # list reads its last user message); id_field empty: ids from the line numbers.
  data.problem_field = "problem"
  data.answer_field = "answer"
  data.id_field = ""
  data.data_dir = ""  # empty: $EXPLORE_JAX_DATA, else the package's data files (explore_jax.paths)
  data.template = "dapo"  # see explore_jax.data.templates
  data.prompts_per_step = 512
  data.max_prompt_len = 1024
  # Difficulty of the synthetic_arithmetic task (explore_jax.data.synthetic.ArithmeticConfig).
  data.synthetic = ml_collections.ConfigDict(dict(
      min_operands=2, max_operands=4, max_number=19, max_value=999, ops="+-*", train_size=20000,
      test_size=500))
  # The countdown task (explore_jax.data.countdown.CountdownConfig).
  data.countdown = countdown_config()
  return data


def rollout_config() -> ml_collections.ConfigDict:
  """Sampling a step's responses: the group size, the sampling settings, the engine."""
  rollout = ml_collections.ConfigDict()
  rollout.n = 8  # samples per prompt (the GRPO group)
  rollout.max_new_tokens = 8192
  rollout.temperature = 1.0
  rollout.top_p = 1.0
  rollout.top_k = 0
  rollout.prompts_per_wave = 0  # static engine: prompts sampled at once; 0 = all of a step
  # "continuous": `slots` decode slots, each refilled as soon as its row ends
  # (explore_jax.rollout.engine; the KV cache is slots x (max_prompt_len + max_new_tokens));
  # "paged": up to `slots` rows at once over a pool of `kv_pages` KV pages that rows take as they
  # grow (explore_jax.rollout.paged; the KV cache is kv_pages x page_size positions);
  # "static": all rows of a wave decode until the last one ends (explore_jax.rollout.sampling).
  rollout.engine = "continuous"
  # Rows decoded at once (continuous: the KV-cache memory bound); 0 = all rows of a step.
  rollout.slots = 0
  # continuous: decode steps a device call's cache read is sized for (the call runs on while its
  # rows fit that read, until refill_share of the slots is free), and the most steps a free slot
  # waits for its refill
  rollout.chunk = 16
  # continuous: decode attention reads each row's filled blocks of this many slots
  # (explore_jax/models/decode_attention.py); 0 = every slot up to the longest row in flight
  rollout.kv_block = 64
  # continuous: a chunk ends early once this share of the slots is free while rows are pending
  rollout.refill_share = 0.25
  # paged: pages in the KV pool (0 = room for every slot's full row: never preempts), positions
  # per page, pages per block of the Pallas kernels' reads, and the page attention ("auto": the
  # Pallas kernel on TPU, the native kernel on CPU where a C++ compiler builds it, a pure-JAX
  # gather elsewhere; "gather", "native_cpu", "pallas_tpu", "pallas_gpu")
  rollout.kv_pages = 0
  rollout.page_size = 16
  rollout.page_block = 2
  rollout.page_attention = "auto"
  return rollout


def reward_config() -> ml_collections.ConfigDict:
  """Grading: the checker, the reward values, the process pool."""
  reward = ml_collections.ConfigDict()
  reward.method = "dapo"  # "dapo" | "math_verify"
  reward.correct = 1.0
  reward.incorrect = -1.0
  reward.timeout_s = 5.0
  reward.workers = 8
  # DAPO's overlong shaping (rewards.overlong_penalty): 0 up to max_new_tokens - overlong_buffer
  # response tokens, then linear down to -overlong_penalty at max_new_tokens. 0 tokens: off.
  reward.overlong_buffer = 0
  reward.overlong_penalty = 1.0
  return reward


def rl_config() -> ml_collections.ConfigDict:
  """The RL update: algorithm, the paper's entropy advantage, the loss and its batch sizes."""
  rl = ml_collections.ConfigDict()
  rl.algorithm = "grpo"  # "grpo" | "ppo"
  rl.entropy_advantage = True  # the paper's psi term
  rl.alpha = 0.4
  rl.kappa = 2.0
  # psi's clip at |A| / kappa; False is a placebo arm, psi = alpha * sg(H) on every token: the
  # same positive offset, whose expected gradient is 0 (H depends on the prefix only), without
  # the clip that makes the paper's term reweight correct and incorrect responses differently.
  rl.entropy_clip = True
  rl.entropy_coef = 0.0  # beta of the entropy regularizer -beta * H (Table 3 baseline)
  rl.kl_coef = 0.0
  rl.kl_kind = "k3"
  rl.clip_low = 0.2
  rl.clip_high = 0.28
  rl.clip_c = 0.0  # dual-clip constant for A < 0; 0 = off (the paper's optional value is 3)
  rl.agg = "token-mean"
  rl.norm_by_std = True
  rl.gamma = 1.0
  rl.lam = 1.0
  rl.whiten_advantages = True  # PPO: masked whitening of GAE advantages
  rl.value_clip = 0.5
  rl.epochs = 1  # passes over each rollout; updates per rollout = epochs * rollouts / mini_batch
  rl.mini_batch_size = 256  # sequences per policy update
  # Sequences per forward/backward (gradient accumulation), set by exactly one of two keys:
  # micro_batch_size counts the whole mesh's sequences (it must split evenly over the data x fsdp
  # batch shards); micro_batch_per_shard counts one batch shard's, so the global micro-batch is
  # micro_batch_per_shard x data x fsdp. The other must be 0.
  rl.micro_batch_size = 32
  rl.micro_batch_per_shard = 0
  rl.critic_warmup_steps = 10  # PPO: critic-only rollouts before policy updates start
  rl.logit_chunk = 1024  # tokens per chunk when projecting hidden states to the vocabulary
  # Static row lengths (evenly spaced up to prompt + response) a micro-batch is cut to after
  # sorting rows by length: skips padding, same result. 1 = off; each length is one compiled
  # branch of the update (compile time grows with it).
  rl.length_buckets = 1
  suite_config(rl)
  return rl


def suite_config(rl: ml_collections.ConfigDict) -> None:
  """The exploration suite's keys (docs/exploration_suite.md), all off by default; the variants
  of `apply_variant` switch them on with their papers' coefficients."""
  # "clip_cov" | "kl_cov" (Cui et al. 2025) replace the PPO surrogate; verl's defaults below.
  rl.policy_loss = "ppo"
  rl.clip_cov_ratio = 2e-4  # share of tokens whose gradient Clip-Cov cuts (random among cands)
  rl.clip_cov_lb = 1.0  # candidates: lb < cov < ub
  rl.clip_cov_ub = 5.0
  rl.kl_cov_ratio = 2e-4  # share of tokens (top covariance) KL-Cov penalises
  rl.kl_cov_coef = 1.0
  # > 0: the policy gradient only through this share of the mini-batch's highest-entropy tokens
  # (Wang et al. 2025: 0.2)
  rl.top_entropy_fraction = 0.0
  # The statistics of the three above, over the whole mini-batch: "current" = the policy being
  # updated (one forward pass per mini-batch, as verl's per micro-batch), "old" = the scoring
  # pass's (free; equal on a rollout's first mini-batch)
  rl.token_stats = "current"
  rl.passk = False  # GRPO's advantage replaced by the analytic pass@k one (Chen et al. 2025)
  rl.passk_k = 4
  # Rollout correction (truncated importance sampling, Yao et al. 2025): > 0 weights each token's
  # policy-loss term by min(pi_old / pi_sampler, cap); tis_mode "token", "sequence" (one weight
  # per row, the product) or "token_mask" (tokens outside [1/cap, cap] dropped)
  rl.tis_cap = 0.0
  rl.tis_mode = "token"
  # DAPO's dynamic sampling: drop groups whose rewards are all equal and sample more prompts
  # until the step has data.prompts_per_step groups with signal, at most filter_max_rounds
  # rollouts (then groups without signal fill the step)
  rl.filter_groups = False
  rl.filter_max_rounds = 10


def optim_config() -> ml_collections.ConfigDict:
  """AdamW and its learning-rate schedule (the paper: lr 1e-6, constant)."""
  optim = ml_collections.ConfigDict()
  optim.lr = 1e-6
  optim.critic_lr = 1e-5
  optim.warmup_steps = 0  # optimizer updates of linear warm-up
  optim.schedule = "constant"  # "constant" | "cosine"
  optim.weight_decay = 0.01
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.max_grad_norm = 1.0
  return optim


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
  """The paper's comparisons: the same experiment with and without the entropy term, and the
  exploration suite's methods (`apply_suite_variant`)."""
  if variant not in VARIANTS + SUITE_VARIANTS:
    raise ValueError(f"variant={variant!r}; known: {VARIANTS + SUITE_VARIANTS}")
  if variant in SUITE_VARIANTS:
    c.rl.entropy_advantage = False
    apply_suite_variant(c, variant)
    return
  if variant.startswith("ppo"):
    c.rl.algorithm = "ppo"
    c.rl.alpha = 0.1
  c.rl.entropy_advantage = variant in ("entropy_adv", "ppo", "placebo")
  c.rl.entropy_clip = variant != "placebo"
  if variant == "entropy_reg":
    c.rl.entropy_coef = 0.001


def apply_suite_variant(c: ml_collections.ConfigDict, variant: str) -> None:
  """GRPO with one method of the exploration suite, at its paper's coefficients
  (docs/exploration_suite.md)."""
  rl = c.rl
  if variant == "clip_cov":  # the paper's 7B recipe in verl: PPO's ratio clip widened to 1
    rl.update(policy_loss="clip_cov", clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
              clip_low=1.0, clip_high=1.0)
  elif variant == "kl_cov":  # the paper's 7B recipe
    rl.update(policy_loss="kl_cov", kl_cov_ratio=0.002, kl_cov_coef=1.0)
  elif variant == "top_entropy":
    rl.top_entropy_fraction = 0.2
  elif variant == "passk":
    rl.update(passk=True, passk_k=4)
  elif variant == "tis":  # verl's default threshold
    rl.update(tis_cap=2.0, tis_mode="token")
  elif variant == "dapo":  # DAPO's buffer: 4096 of 20480 tokens, a fifth of the response
    rl.filter_groups = True
    c.reward.overlong_buffer = max(1, c.rollout.max_new_tokens // 5)
    c.reward.overlong_penalty = 1.0
