r"""The paper's comparison on the countdown testbed at CPU scale (explore_jax/demo/study.py).

    python -m explore_jax.demo --config configs/demo.py --workdir runs/demo                # make demo
    python -m explore_jax.demo --config configs/demo.py:plan=study --workdir runs/study   # make study
    python -m explore_jax.demo --config configs/demo.py:plan=suite --workdir runs/suite   # make suite

plan=demo (the main job): one seed of two arms, GRPO (baseline) and GRPO + entropy advantage (the
paper's alpha 0.4), from one pre-trained base, evaluated on 200 held-out problems with 64 samples
each; the pipeline end to end in under 10 minutes, without the power to tell arms apart.

plan=study: 5 seeds of 5 arms, paired by seed and data order: the baseline; the entropy advantage
at alpha 0.4 and at alpha 2 (where its clip |A|/kappa binds on most high-entropy tokens, for
A > 0 too); the entropy regularizer (beta 0.001); and the placebo, psi = alpha * sg(H) without
the clip, which separates the clip's effect from that of a positive offset. 128 samples per
held-out problem. About an hour on 2 cores.

plan=suite: the paper's method against the exploration suite (docs/exploration_suite.md), 5
seeds of 7 arms, paired as in plan=study: the baseline; the entropy advantage (alpha 0.4);
Clip-Cov; KL-Cov; high-entropy tokens only (the top 20%); the pass@k advantage (k = 4); and the
placebo. Each suite method's coefficient was tuned once on a held-out seed so that it acts on
this testbed (SUITE_ARMS; docs/exploration_suite.md has the tuning runs and the shares of tokens
each selects). 128 samples per held-out problem.

`size=test` is the shortened demo that tests/test_demo.py runs (seconds per step).
"""

import ml_collections

from explore_jax.config import defaults as common
from explore_jax.demo import study as demo
from explore_jax.evaluation import evaluate


# The suite's arms on the countdown testbed: variant and rl.* overrides. Coefficients tuned once
# on seed 100 (held out from the study's seeds 0-4) so that each method acts here:
# docs/exploration_suite.md, "Tuning on the countdown testbed".
# A mini-batch here holds about 3,900 response tokens: Clip-Cov's 2e-4 cuts 1 of them (of ~19
# candidates) and KL-Cov's 0.002 penalises 8; at 0.005 Clip-Cov cuts most of its candidates and
# at 0.02 KL-Cov penalises 2% of the tokens. Top-entropy's 0.2 and pass@k's k = 4 (of 16) act at
# their papers' values.
SUITE_ARMS = dict(
    clip_cov=dict(variant="clip_cov", clip_cov_ratio=0.005),
    kl_cov=dict(variant="kl_cov", kl_cov_ratio=0.02),
    top_entropy=dict(variant="top_entropy"),
    passk=dict(variant="passk"),
)


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, plan="demo", seeds=0, steps=40, problems=200, size="demo")
  if args.plan not in ("demo", "study", "suite"):
    raise ValueError(f"plan={args.plan!r}: use 'demo', 'study' or 'suite'")
  study = args.plan in ("study", "suite")
  test = args.size == "test"  # the shortened demo of tests/test_demo.py
  c = ml_collections.ConfigDict()
  c.train = common.countdown_testbed(args.size)
  c.train.total_steps = args.steps
  c.seeds = args.seeds or (5 if study else 1)
  c.arms = ml_collections.ConfigDict(dict(baseline=demo.arm("baseline"),
                                          entropy_adv=demo.arm("entropy_adv")))
  if args.plan == "study":
    c.arms.entropy_adv_a2 = demo.arm("entropy_adv", alpha=2.0)
    c.arms.entropy_reg = demo.arm("entropy_reg")
    c.arms.placebo = demo.arm("placebo")
  if args.plan == "suite":
    for name, spec in SUITE_ARMS.items():
      c.arms[name] = demo.arm(**spec)
    c.arms.placebo = demo.arm("placebo")
  c.baseline_arm = "baseline"  # every other arm is compared with this one
  c.eval = evaluate.base_config()
  c.eval.batch_size = 64 if test else 1024
  c.eval.slots = 0 if test else 512  # 0: batch_size slots
  c.eval.kv_block = c.train.rollout.kv_block
  c.eval.refill_share = c.train.rollout.refill_share
  c.eval.prompt_bucket = 16
  c.eval.reward_workers = c.train.reward.workers
  # The demo owns its eval dir: responses of a model since retrained (e.g. a longer budget) are
  # moved aside and sampled again.
  c.eval.on_changed_responses = "set_aside"
  c.eval.sampling.temperature = 0.6  # the paper's evaluation protocol
  c.eval.sampling.top_p = 0.95
  c.eval.sampling.max_new_tokens = c.train.rollout.max_new_tokens
  c.eval.countdown = c.train.data.countdown
  c.eval.benchmarks.heldout = evaluate.benchmark(
      "countdown", 8 if test else 128 if study else 64, split="test", template="countdown",
      reward_method="countdown", max_problems=args.problems)
  c.bootstrap_draws = 2000
  c.analysis = ml_collections.ConfigDict(dict(
      responses=32 if test else 256,  # per model (seed 0), for the paper's three analyses
      rare=not test,  # the rare-sentence analysis (loads the all-MiniLM-L6-v2 embedder)
  ))
  c.base_model_dir = ""  # where the pre-trained base is cached; empty: WORKDIR/base_model
  c.heatmap_responses = 2 if test else 4  # responses per model coloured by token entropy
  return c
