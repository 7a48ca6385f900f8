"""What `rl.length_buckets` saves: the trainer's old-log-prob pass and update, buckets on vs off.

  .venv/bin/python benchmarks/length_buckets.py                       # the demo's shapes
  .venv/bin/python benchmarks/length_buckets.py --buckets 1,2,4 --lengths uniform --steps 3

Runs the real jitted `explore_jax.train.step.score_rollout` and `update` of the arithmetic config
(`defaults.tiny_config`, configs/tiny_cpu.py: its model, 64 prompts x 8 responses, mini-batch
256, micro-batch 64, prompts of up to 24 tokens, responses of up to 48) on a random model and a
batch of random tokens whose lengths follow `--lengths`:
  * demo:    prompts of 12-24 tokens, responses 8 + Geometric(1/16) tokens capped at 48 (mean
             about 22, about 8% at the cap): the shape of the demo's own rollouts (mean 20-23
             tokens, max 48, `rollout/response_length_*` in its metrics);
  * uniform: prompts and responses uniform between half and all of their caps (the train-step
             benchmark's batch);
  * full:    every row at full length (nothing to skip: the price of the sort and the switch).
For each bucket count it prints the median time of each phase over the steps (configs alternate
within each step, so machine noise hits them alike), the ratio to buckets=1, the mean fraction
of P + N computed (`perf/update_length_frac`), and how far the result is from buckets=1: the
largest weight difference relative to the largest weight change of the update (asserted below
1e-3), and the largest old-log-prob difference (asserted below 1e-4). Float rounding only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from explore_jax.config import defaults
from explore_jax.demo import pretrain
from explore_jax.models import qwen2
from explore_jax.rollout import sampling
from explore_jax.tpu import sharding
from explore_jax.train import setup
from explore_jax.train import state as train_state
from explore_jax.train import step as ts


def make_rollout(rows: int, p: int, n: int, vocab: int, lengths: str, seed: int = 0):
  rng = np.random.default_rng(seed)
  if lengths == "demo":
    prompt_len = rng.integers(p // 2, p + 1, rows)
    resp_len = np.minimum(8 + rng.geometric(1 / 16, rows), n)
  elif lengths == "uniform":
    prompt_len = rng.integers(p // 2, p + 1, rows)
    resp_len = rng.integers(n // 2, n + 1, rows)
  elif lengths == "full":
    prompt_len, resp_len = np.full(rows, p), np.full(rows, n)
  else:
    raise ValueError(f"--lengths={lengths!r}: use demo, uniform or full")
  pmask = (np.arange(p)[None] >= p - prompt_len[:, None]).astype(np.int32)
  mask = (np.arange(n)[None] < resp_len[:, None]).astype(np.int32)
  prompts = np.where(pmask > 0, rng.integers(1, vocab, (rows, p)), 0).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(1, vocab, (rows, n)), 0).astype(np.int32)
  zeros = jnp.zeros((rows, n), jnp.float32)
  rollout = sampling.Rollout(
      tokens=jnp.asarray(tokens), logprobs=zeros, entropy=zeros, mask=jnp.asarray(mask),
      lengths=jnp.asarray(resp_len, jnp.int32), finish_reason=jnp.zeros(rows, jnp.int32),
      prompt_tokens=jnp.asarray(prompts), prompt_mask=jnp.asarray(pmask))
  scores = jnp.asarray(rng.choice([0.0, 1.0], rows), jnp.float32)
  return rollout, scores, float(np.mean(prompt_len)), float(np.mean(resp_len))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--buckets", default="1,2,4,8", help="comma-separated bucket counts")
  parser.add_argument("--lengths", default="demo", help="demo | uniform | full")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per bucket count")
  parser.add_argument("--micro_batch_size", type=int, default=0, help="0: the demo's (64)")
  args = parser.parse_args()
  counts = [int(b) for b in args.buckets.split(",")]
  if counts[0] != 1:
    counts = [1] + counts  # the reference every other count is compared with

  config = defaults.tiny_config("demo")
  config.rl.micro_batch_size = args.micro_batch_size or config.rl.micro_batch_size
  model_cfg = pretrain.model_config(config, vocab_size=384, eos_id=1)  # the tiny BPE's size
  rows = config.data.prompts_per_step * config.rollout.n
  p, n = config.data.max_prompt_len, config.rollout.max_new_tokens
  rollout, scores, mean_p, mean_n = make_rollout(rows, p, n, model_cfg.vocab_size, args.lengths)

  mesh = sharding.make_mesh((1, 1, 1))
  rules = sharding.DEFAULT_RULES
  tx = train_state.make_optimizer(
      train_state.lr_schedule(config.optim.lr, config.optim, 1000), config.optim)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shapes, specs = train_state.abstract_state(model_cfg, tx, tx, ppo=False)
    params = qwen2.init_params(model_cfg, jax.random.PRNGKey(0))
    state0 = train_state.init_state(model_cfg, params, tx, tx, False, 0,
                                    train_state.state_shardings(shapes, specs, mesh, rules))
    base = setup.step_config(config, model_cfg)
    cfgs = {c: ts.StepConfig(**{**base.__dict__, "length_buckets": c}) for c in counts}

    def run(count):
      """One rollout's old-log-prob pass and update from the same state: (times, outputs)."""
      cfg = cfgs[count]
      start = time.perf_counter()
      batch, _ = ts.score_rollout(state0, None, rollout, scores, cfg=cfg)
      jax.block_until_ready(batch)
      mid = time.perf_counter()
      state, metrics = ts.update(jax.tree.map(jnp.copy, state0), batch, cfg=cfg, actor_tx=tx,
                                 critic_tx=tx, train_actor=True)
      jax.block_until_ready(state)
      end = time.perf_counter()
      return (mid - start, end - mid), (batch["old_logprobs"], state.actor, metrics)

    compile_s, outputs, times = {}, {}, {c: [] for c in counts}
    for c in counts:
      start = time.perf_counter()
      _, outputs[c] = run(c)
      compile_s[c] = time.perf_counter() - start
    for _ in range(args.steps):
      for c in counts:
        times[c].append(run(c)[0])

  print(f"jax {jax.__version__} ({jax.default_backend()}), demo model "
        f"({model_cfg.num_hidden_layers} layers, width {model_cfg.hidden_size}), {rows} rows of "
        f"{p} + {n} tokens (mean {mean_p:.1f} + {mean_n:.1f}), lengths={args.lengths}, "
        f"median of {args.steps}")
  print(f"{'buckets':>7}  {'lengths':<24} {'old-logp ms':>11} {'update ms':>9} {'total ms':>8} "
        f"{'speed-up':>8} {'computed':>8} {'dW / |W-W0|':>11} {'max |dlogp|':>11} {'first s':>7}")
  ref_total = None
  for c in counts:
    score_ms = 1e3 * statistics.median(t[0] for t in times[c])
    update_ms = 1e3 * statistics.median(t[1] for t in times[c])
    total = score_ms + update_ms
    ref_total = ref_total or total
    logp, actor, metrics = outputs[c]
    logp1, actor1, _ = outputs[counts[0]]
    diff = lambda x, y: max(float(jnp.max(jnp.abs(a - b))) for a, b in
                            zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    dw = diff(actor, actor1) / diff(actor1, state0.actor)  # relative to the update itself
    dlogp = float(jnp.max(jnp.abs(logp - logp1)))
    assert dw < 1e-3 and dlogp < 1e-4, f"buckets={c}: differs from buckets=1 ({dw}, {dlogp})"
    lengths = ",".join(map(str, ts.bucket_lengths(p + n, c)))
    print(f"{c:>7}  {lengths:<24} {score_ms:>11.1f} {update_ms:>9.1f} {total:>8.1f} "
          f"{ref_total / total:>7.2f}x {float(metrics['perf/update_length_frac']):>8.2f} "
          f"{dw:>11.1e} {dlogp:>11.1e} {compile_s[c]:>7.1f}")


if __name__ == "__main__":
  main()
