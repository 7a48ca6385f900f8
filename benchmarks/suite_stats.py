"""What the exploration suite's mini-batch statistics cost: the update with Clip-Cov, KL-Cov and
the top-entropy mask against the plain GRPO update.

  .venv/bin/python benchmarks/suite_stats.py                    # the countdown testbed's shapes
  .venv/bin/python benchmarks/suite_stats.py --steps 5 --methods clip_cov,top_entropy

Runs the real jitted `explore_jax.train.step.update` of the countdown testbed
(`defaults.countdown_testbed`, configs/countdown.py: its model, 32 prompts x 16 responses,
mini-batch 128, micro-batch 64, prompts of up to 16 tokens, responses of up to 144) on a random
model and a batch of random tokens with the demo's length profile (benchmarks/length_buckets.py),
once per configuration:
  * plain:          GRPO's PPO surrogate (the baseline variant), the reference;
  * METHOD/current: the suite method with `rl.token_stats="current"` (the default): a forward
                    pass of the mini-batch before its accumulation, for the statistics;
  * METHOD/old:     the same with "old": the statistics from the scoring pass's log-probs, no
                    extra pass (only the selection itself: covariance, sort, draw);
  * plain/again:    the reference once more, last in each round: how far apart two timings of
                    the same program are on this machine.
It prints the median update time over the steps (configurations alternate within each step, so
machine noise hits them alike), its ratio to plain, and the selected share of tokens. The ratio of
"current" is what a run pays for statistics that are exactly the current policy's over the whole
mini-batch; expect about 1 + (forward / (forward + backward)) of the actor's update.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from explore_jax.config import defaults
from explore_jax.demo import pretrain
from explore_jax.models import qwen2
from explore_jax.tpu import sharding
from explore_jax.train import setup
from explore_jax.train import state as train_state
from explore_jax.train import step as ts
from length_buckets import make_rollout

SHARE_KEYS = {"clip_cov": "actor/clip_cov_frac", "kl_cov": "actor/kl_cov_frac",
              "top_entropy": "actor/top_entropy_frac"}


def step_configs(config, model_cfg, methods):
  """{name: StepConfig}: plain, then METHOD/current and METHOD/old for each method."""
  cfgs = {}
  for name in (["plain"] + [f"{m}/{s}" for m in methods for s in ("current", "old")]
               + ["plain/again"]):
    c = defaults.countdown_testbed("demo")
    c.rl.micro_batch_size = config.rl.micro_batch_size
    plain = name.startswith("plain")
    defaults.apply_variant(c, "baseline" if plain else name.split("/")[0])
    if not plain:
      c.rl.token_stats = name.split("/")[1]
    cfgs[name] = setup.step_config(c, model_cfg)
  return cfgs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default="clip_cov,kl_cov,top_entropy")
  parser.add_argument("--steps", type=int, default=3, help="timed updates per configuration")
  parser.add_argument("--micro_batch_size", type=int, default=0, help="0: the testbed's (64)")
  args = parser.parse_args()
  methods = args.methods.split(",")
  for m in methods:
    if m not in SHARE_KEYS:
      raise SystemExit(f"--methods: {m!r} is not one of {sorted(SHARE_KEYS)}")

  config = defaults.countdown_testbed("demo")
  config.rl.micro_batch_size = args.micro_batch_size or config.rl.micro_batch_size
  model_cfg = pretrain.model_config(config, vocab_size=384, eos_id=1)  # the tiny BPE's size
  rows = config.data.prompts_per_step * config.rollout.n
  p, n = config.data.max_prompt_len, config.rollout.max_new_tokens
  rollout, scores, mean_p, mean_n = make_rollout(rows, p, n, model_cfg.vocab_size, "demo")
  scores = scores * 2 - 1  # the testbed's +-1 rewards

  mesh = sharding.make_mesh((1, 1, 1))
  rules = sharding.DEFAULT_RULES
  tx = train_state.make_optimizer(
      train_state.lr_schedule(config.optim.lr, config.optim, 1000), config.optim)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shapes, specs = train_state.abstract_state(model_cfg, tx, tx, ppo=False)
    params = qwen2.init_params(model_cfg, jax.random.PRNGKey(0))
    state0 = train_state.init_state(model_cfg, params, tx, tx, False, 0,
                                    train_state.state_shardings(shapes, specs, mesh, rules))
    cfgs = step_configs(config, model_cfg, methods)
    batch, _ = ts.score_rollout(state0, None, rollout, scores, cfg=cfgs["plain"])
    compiled = {name: ts.update.lower(state0, batch, cfg=cfg, actor_tx=tx, critic_tx=tx,
                                      train_actor=True).compile()
                for name, cfg in cfgs.items()}

    def run(name):
      start = time.perf_counter()
      state, metrics = compiled[name](jax.tree.map(jnp.copy, state0), batch)
      jax.block_until_ready(state)
      return time.perf_counter() - start, metrics

    shares = {name: run(name)[1] for name in cfgs}  # the first call of each, untimed
    times = {name: [] for name in cfgs}
    for _ in range(args.steps):
      for name in cfgs:
        times[name].append(run(name)[0])

  cfg = cfgs["plain"]
  print(f"jax {jax.__version__} ({jax.default_backend()}), countdown testbed model "
        f"({model_cfg.num_hidden_layers} layers, width {model_cfg.hidden_size}), {rows} rows of "
        f"{p} + {n} tokens (mean {mean_p:.1f} + {mean_n:.1f}), mini-batch {cfg.mini_batch_size}, "
        f"micro-batch {cfg.micro_batch_size}, median of {args.steps}")
  print(f"{'update':<20} {'ms':>9} {'x plain':>8} {'selected share':>15}")
  ref = statistics.median(times["plain"])
  for name in cfgs:
    t = statistics.median(times[name])
    key = SHARE_KEYS.get(name.split("/")[0])
    share = f"{float(shares[name][key]):.4f}" if key else "-"
    print(f"{name:<20} {1e3 * t:>9.1f} {t / ref:>7.2f}x {share:>15}")


if __name__ == "__main__":
  main()
