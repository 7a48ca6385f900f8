"""GPU figures of merit: train-step MFU at Qwen2.5-0.5B shapes, decode throughput vs HBM roofline.

  bash benchmarks/gpu.sh                                    # on an NVIDIA GPU (see gpu.sh)
  python benchmarks/gpu_bench.py train  [--rows 16 --micro 4 --prompt 512 --response 1536]
  python benchmarks/gpu_bench.py decode [--decode_batch 256 --decode_prompt 128 --decode_new 512]
  python benchmarks/gpu_bench.py both --smoke               # CPU: tiny, float32, a few steps

Random weights (`qwen2.init_params` on the preset config; nothing is downloaded), bf16 parameters
and compute.

(a) Train: `explore_jax.train.step.update`, the trainer's jitted step (GRPO, entropy advantage,
    token-mean, remat on), mini-batch = all rows (one AdamW step per call), accumulated over
    micro-batches of `--micro` rows. Model FLOPs per step (no remat recompute counted):
        6 * N_body * R * T          the decoder layers' matmuls, N_body = params without embeddings
      + 6 * D * V * R * N_resp      the output projection, only on the response positions
      + 12 * L * T^2 * D_attn * R   attention scores and values, full T x T as computed
    MFU = model FLOPs / step time / chip peak (bf16 dense). On out-of-memory the micro-batch is
    halved and the step rebuilt.
(b) Decode: `explore_jax.rollout.generate` at batch 256 with no EOS (every row runs all its new
    tokens), with each engine of `--engines` (the continuous and paged ones with a slot per row;
    "paged" reads its pages with the pure-JAX gather, "paged-pallas" with the Pallas GPU paged
    attention kernel; pages of 16, a pool with room for every row). Decode
    time = time(generate, N new) - time(generate, 1 new) (the prefill), over N - 1 steps.
    Roofline step time = (parameter bytes + KV bytes at the average context P + N / 2) / HBM
    bandwidth; the figure is roofline step time / measured step time.
Targets: MFU >= 45%, decode >= 50% of the roofline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from explore_jax import rollout as rollout_lib
from explore_jax.config import defaults
from explore_jax.models import qwen2  # noqa: E402
from explore_jax.rl import actor_loss as actor_lib  # noqa: E402
from explore_jax.rollout import sampling
from explore_jax.tpu import sharding
from explore_jax.train import state as train_state  # noqa: E402
from explore_jax.train import step as ts  # noqa: E402

# nvidia-smi name fragment -> (bf16 dense FLOP/s, HBM bytes/s); first match wins.
CHIPS = (
    ("GH200", 989e12, 4.0e12),
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),  # SXM
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100", 312e12, 1.555e12),
)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
MFU_TARGET, ROOFLINE_TARGET = 0.45, 0.50
# The sampler grows its KV cache between decode segments, so the donated smaller cache cannot be
# reused in place; expected, and not a leak.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def chip_name() -> str:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return out.strip().splitlines()[0]
  except (OSError, subprocess.SubprocessError, IndexError):
    return jax.devices()[0].device_kind


def chip_peaks(name: str, args) -> tuple[float | None, float | None]:
  flops, bw = None, None
  for fragment, f, b in CHIPS:
    if fragment.lower() in name.lower():
      flops, bw = f, b
      break
  if args.peak_tflops:
    flops = args.peak_tflops * 1e12
  if args.hbm_tbps:
    bw = args.hbm_tbps * 1e12
  return flops, bw


def model_config(args) -> qwen2.Qwen2Config:
  dtype = "float32" if args.smoke else "bfloat16"
  base = qwen2.Qwen2Config(**TINY) if args.smoke else qwen2.preset(args.preset)
  return base.replace(param_dtype=dtype, dtype=dtype, remat=True)


def si(x: float, unit: str) -> str:
  """1.5e13, "FLOP" -> "15.0 TFLOP" (G below 1e12, so that the smoke run shows digits too)."""
  return f"{x / 1e12:.1f} T{unit}" if x >= 1e12 else f"{x / 1e9:.3f} G{unit}"


def pct(x: float | None) -> str:
  return "n/a (unknown chip: pass --peak_tflops / --hbm_tbps)" if x is None else f"{100 * x:.1f}%"


# --------------------------------------------------------------------------------------------------
# (a) Train step
# --------------------------------------------------------------------------------------------------


def step_flops(cfg: qwen2.Qwen2Config, n_params: int, rows: int, p: int, n: int) -> dict:
  t = p + n
  embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  body = n_params - embed
  attn_width = cfg.num_attention_heads * cfg.head_dim
  terms = {
      "layers 6*N_body*R*T": 6 * body * rows * t,
      "output 6*D*V*R*N_resp": 6 * cfg.hidden_size * cfg.vocab_size * rows * n,
      "attention 12*L*T^2*D_attn*R": 12 * cfg.num_hidden_layers * t * t * attn_width * rows,
  }
  return dict(terms=terms, total=sum(terms.values()), body=body, headline=6 * n_params * rows * t)


def train_once(model_cfg, rows: int, micro: int, p: int, n: int, steps: int, chunk: int):
  """(compile s, median step s, loss) of `update` at rows x (p + n), micro-batches of `micro`."""
  loss_cfg = actor_lib.LossConfig(entropy_advantage=True, alpha=0.4, kappa=2.0)
  cfg = ts.StepConfig(model=model_cfg, loss=loss_cfg, algorithm="grpo", group_size=8,
                      norm_by_std=True, gamma=1.0, lam=1.0, whiten_advantages=False,
                      value_clip=0.5, epochs=1, mini_batch_size=rows, micro_batch_size=micro,
                      logit_chunk=chunk, on_nonfinite="raise")
  optim = defaults.base_config().optim
  tx = train_state.make_optimizer(train_state.lr_schedule(1e-6, optim, 1000), optim)
  mesh, rules = sharding.make_mesh((1, 1, 1)), sharding.DEFAULT_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shapes, specs = train_state.abstract_state(model_cfg, tx, tx, ppo=False)
    shardings = train_state.state_shardings(shapes, specs, mesh, rules)
    params = jax.jit(lambda r: qwen2.init_params(model_cfg, r), out_shardings=shardings.actor)(
        jax.random.PRNGKey(0))
    state = train_state.init_state(model_cfg, params, tx, tx, False, 0, shardings)
    del params
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    tokens = jax.random.randint(k1, (rows, p + n), 0, model_cfg.vocab_size, jnp.int32)
    mask = jnp.ones((rows, n), jnp.int32)
    sign = jnp.where(jax.random.bernoulli(k2, 0.5, (rows, 1)), 1.0, -1.0)
    batch = dict(tokens=tokens, attn_mask=jnp.ones_like(tokens), targets=tokens[:, p:], mask=mask,
                 # about the log-prob of a random-init model, so that ratios are near 1
                 old_logprobs=jnp.full((rows, n), -np.log(model_cfg.vocab_size), jnp.float32),
                 advantages=sign * mask)
    times, loss = [], None
    for i in range(steps + 1):
      start = time.perf_counter()
      state, metrics = ts.update(state, batch, cfg=cfg, actor_tx=tx, critic_tx=tx,
                                 train_actor=True)
      loss = float(jax.device_get(metrics["actor/loss"]))
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times[1:])
  return times[0] - step_s, step_s, loss


def bench_train(args, peak_flops) -> None:
  model_cfg = model_config(args)
  rows, micro, p, n = args.rows, args.micro, args.prompt, args.response
  if rows % micro:
    raise SystemExit(f"--rows={rows} must be a multiple of --micro={micro}")
  n_params = sum(x.size for x in jax.tree.leaves(qwen2.param_shapes(model_cfg)))
  while True:
    try:
      compile_s, step_s, loss = train_once(model_cfg, rows, micro, p, n, args.steps,
                                           args.logit_chunk)
      break
    except Exception as e:  # XlaRuntimeError has no stable import path across jax versions
      oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
      if not oom or micro == 1:
        raise
      print(f"  out of memory at micro-batch {micro}; retrying with {micro // 2}", flush=True)
      micro //= 2
  f = step_flops(model_cfg, n_params, rows, p, n)
  achieved = f["total"] / step_s
  print(f"(a) train step: {n_params / 1e6:.0f}M params ({f['body'] / 1e6:.0f}M without "
        f"embeddings), {model_cfg.dtype}, remat on, rows {rows} x (prompt {p} + response {n}) = "
        f"{rows * (p + n)} tokens, micro-batch {micro}, loss {loss:.4f}")
  for name, v in f["terms"].items():
    print(f"    {name:<30}{si(v, 'FLOP'):>14}")
  print(f"    {'model FLOPs per step':<30}{si(f['total'], 'FLOP'):>14}   "
        f"(headline 6*N*tokens = {si(f['headline'], 'FLOP')})")
  print(f"    compile {compile_s:.1f} s; step {1e3 * step_s:.1f} ms (median of {args.steps}); "
        f"{rows * (p + n) / step_s:,.0f} tokens/s; {si(achieved, 'FLOP/s')}")
  mfu = achieved / peak_flops if peak_flops else None
  print(f"    MFU {pct(mfu)}   (target >= {100 * MFU_TARGET:.0f}%)", flush=True)


# --------------------------------------------------------------------------------------------------
# (b) Decode
# --------------------------------------------------------------------------------------------------


def bench_decode(args, hbm_bw) -> None:
  model_cfg = model_config(args)
  b, p, n = args.decode_batch, args.decode_prompt, args.decode_new
  params = jax.jit(lambda r: qwen2.init_params(model_cfg, r))(jax.random.PRNGKey(0))
  prompts = jax.random.randint(jax.random.PRNGKey(1), (b, p), 0, model_cfg.vocab_size, jnp.int32)
  prompt_mask = jnp.ones((b, p), jnp.int32)
  itemsize = jnp.dtype(model_cfg.param_dtype).itemsize
  n_params = sum(x.size for x in jax.tree.leaves(params))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  cache = jax.eval_shape(lambda: qwen2.init_cache(model_cfg, 1, 1))
  # Keys and values of every layer, one slot.
  kv_per_token = sum(x.size * x.dtype.itemsize for x in (*cache.k, *cache.v))
  avg_ctx = p + n / 2
  kv_bytes = b * avg_ctx * kv_per_token
  step_bytes = param_bytes + kv_bytes
  print(f"(b) decode: {n_params / 1e6:.0f}M params ({itemsize} bytes each), batch {b}, prompt {p}, "
        f"{n} new tokens, no EOS; engines: {args.engines}")
  print(f"    bytes/step = params {param_bytes / 1e9:.3f} GB + KV at avg context {avg_ctx:.0f} "
        f"({kv_per_token} B/token) {kv_bytes / 1e9:.3f} GB = {step_bytes / 1e9:.3f} GB")

  def timed(new: int, engine: str) -> tuple[float, float, np.ndarray]:
    """(first call s, best warm call s, the last call's tokens) of generate with `new` tokens per
    row, no EOS; the continuous and paged engines with one slot per row."""
    kw = {"static": dict(engine="static"), "continuous": dict(engine="continuous", slots=b),
          "paged": dict(engine="paged", slots=b, page_attention="gather"),
          "paged-pallas": dict(engine="paged", slots=b, page_attention="pallas_gpu")}[engine]
    times = []
    for i in range(1 + args.decode_repeats):
      start = time.perf_counter()
      r = rollout_lib.generate(model_cfg, params, prompts, prompt_mask, jax.random.PRNGKey(i),
                               max_new_tokens=new, eos_id=sampling.NO_EOS, **kw)
      lengths = np.asarray(r.lengths)
      times.append(time.perf_counter() - start)
      assert lengths.min() == new, f"rows stopped early: {lengths.min()} < {new}"
    return times[0], min(times[1:]), np.asarray(r.tokens)

  tokens = {}
  for engine in args.engines.split(","):
    first_prefill, prefill_s, _ = timed(1, engine)
    first_full, full_s, tokens[engine] = timed(n, engine)
    decode_s = max(full_s - prefill_s, 1e-9)
    step_s = decode_s / (n - 1)
    print(f"  {engine}: compile+first call: prefill-only {first_prefill:.1f} s, full "
          f"{first_full:.1f} s; warm: prefill {1e3 * prefill_s:.1f} ms, full {1e3 * full_s:.1f} ms")
    print(f"    {engine} decode {1e3 * step_s:.3f} ms/step, {b * (n - 1) / decode_s:,.0f} "
          f"tokens/s; end to end {b * n / full_s:,.0f} tokens/s; achieved "
          f"{si(step_bytes / step_s, 'B/s')}")
    if hbm_bw:
      roof_s = step_bytes / hbm_bw
      print(f"    {engine} roofline step {1e3 * roof_s:.3f} ms at {hbm_bw / 1e12:.2f} TB/s -> "
            f"{pct(roof_s / step_s)} of roofline   (target >= {100 * ROOFLINE_TARGET:.0f}%)",
            flush=True)
    else:
      print(f"    {engine} fraction of roofline {pct(None)}   "
            f"(target >= {100 * ROOFLINE_TARGET:.0f}%)", flush=True)
  first = next(iter(tokens))
  for engine, t in list(tokens.items())[1:]:
    print(f"    rows identical to {first}'s (same rng): {engine} "
          f"{np.mean(np.all(tokens[first] == t, 1)):.0%}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", nargs="?", default="both", choices=("train", "decode", "both"))
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model, float32, small shapes: runs on CPU in about a minute")
  parser.add_argument("--preset", default="qwen2.5-0.5b")
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--micro", type=int, default=4, help="rows per forward/backward")
  parser.add_argument("--prompt", type=int, default=512)
  parser.add_argument("--response", type=int, default=1536)
  parser.add_argument("--steps", type=int, default=5, help="timed train steps after the first")
  parser.add_argument("--logit_chunk", type=int, default=512)
  parser.add_argument("--decode_batch", type=int, default=256)
  parser.add_argument("--decode_prompt", type=int, default=128)
  parser.add_argument("--decode_new", type=int, default=512)
  parser.add_argument("--decode_repeats", type=int, default=2)
  parser.add_argument("--engines", default="static,continuous,paged,paged-pallas",
                      help="engines timed in (b): static, continuous, paged, paged-pallas")
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="override the chip table")
  parser.add_argument("--hbm_tbps", type=float, default=0.0, help="override the chip table")
  args = parser.parse_args()
  if args.smoke:
    args.rows, args.micro, args.prompt, args.response, args.steps = 4, 2, 32, 96, 2
    args.logit_chunk = 64
    args.decode_batch, args.decode_prompt, args.decode_new, args.decode_repeats = 8, 16, 32, 1
    # The Pallas GPU kernel runs only interpreted on CPU (slowly): not in the smoke run.
    args.engines = ",".join(e for e in args.engines.split(",") if e != "paged-pallas")
  elif jax.default_backend() != "gpu":
    raise SystemExit(f"jax backend is {jax.default_backend()!r}, not gpu: install jax[cuda12] "
                     "(benchmarks/gpu.sh does) or pass --smoke for the CPU check")
  name = chip_name()
  peak_flops, hbm_bw = chip_peaks(name, args)
  fmt = lambda x, unit, s: "unknown" if x is None else f"{x / s:g} {unit}"
  print(f"device: {name} ({jax.default_backend()}, jax {jax.__version__}); peak bf16 "
        f"{fmt(peak_flops, 'TFLOP/s', 1e12)}, HBM {fmt(hbm_bw, 'TB/s', 1e12)}"
        + ("; SMOKE MODE (tiny float32 model, figures meaningless)" if args.smoke else ""),
        flush=True)
  if args.what in ("train", "both"):
    bench_train(args, peak_flops)
  if args.what in ("decode", "both"):
    bench_decode(args, hbm_bw)


if __name__ == "__main__":
  main()
