"""Tokens/s of one GRPO update step: the explore_jax trainer vs the same loss in PyTorch.

  .venv/bin/python benchmarks/train_step.py                     # both configs
  .venv/bin/python benchmarks/train_step.py --configs tiny --steps 10 --torch_threads 2

One step = forward, backward and one AdamW step (global-norm clip 1.0) on a GRPO batch, with the
paper's entropy advantage (psi = min(alpha * stop_gradient(H), |A| / kappa), alpha 0.4, kappa 2),
PPO clip 0.2 / 0.28, token-mean loss.
  * JAX: the real trainer, `explore_jax.train.step.update` (jitted, state donated) with
    mini_batch_size == micro_batch_size == rows, so one call is exactly one optimizer step; the
    state comes from `explore_jax.train.state` as in `explore_jax.train`.
  * PyTorch: transformers' `Qwen2ForCausalLM` (sdpa attention, logits only for the response
    positions via `logits_to_keep`), log_softmax + gather, entropy from the same logits, the same
    surrogate written out below, `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (foreach).
Both run float32 on the same converted weights and the same batch: left-padded prompts of random
length, responses of random length (padding after each), advantages +-1 per row, old log-probs =
the model's own log-probs plus N(0, 0.1) noise so that some ratios clip. The first-step losses and
pre-clip gradient norms of the two are printed and asserted equal (rel 1e-4 / 1e-3).

Tokens/s counts every padded position of a row (rows x (prompt + response)) over the median step
time; steps of the two frameworks alternate so that noise from a shared machine hits both alike.
The JAX compile time (first call minus a warm step) is reported separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from explore_jax.config import defaults
from explore_jax.models import checkpoint, qwen2
from explore_jax.rl import actor_loss as actor_lib
from explore_jax.tpu import sharding
from explore_jax.train import state as train_state
from explore_jax.train import step as ts

CONFIGS = {
    "tiny": dict(model=dict(vocab_size=512, hidden_size=128, intermediate_size=384,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
                 rows=16, prompt=32, response=96),
    "small": dict(model=dict(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
                  rows=8, prompt=64, response=128),
}
ALPHA, KAPPA, CLIP_LOW, CLIP_HIGH, LR = 0.4, 2.0, 0.2, 0.28, 1e-5


def make_models(spec: dict):
  """A random HF Qwen2 (biases and norms randomised too) and its explore_jax config and params."""
  torch.manual_seed(0)
  hcfg = transformers.Qwen2Config(**spec, max_position_embeddings=1024, tie_word_embeddings=False,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=0,
                                  attn_implementation="sdpa")
  hf = transformers.Qwen2ForCausalLM(hcfg).float().train()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif "norm" in name:
        p.uniform_(0.8, 1.2)
  cfg, params = checkpoint.from_hf_model(hf)
  return hf, cfg, jax.tree.map(jnp.asarray, params)


def make_batch(rows: int, p: int, n: int, vocab: int, seed: int = 0) -> dict:
  """Synthetic GRPO batch (numpy): left-padded prompts, right-padded responses, +-1 advantages."""
  rng = np.random.default_rng(seed)
  prompt_len = rng.integers(p // 2, p + 1, rows)
  resp_len = rng.integers(n // 2, n + 1, rows)
  prompt_mask = (np.arange(p)[None] >= p - prompt_len[:, None]).astype(np.int32)  # [R, P]
  mask = (np.arange(n)[None] < resp_len[:, None]).astype(np.int32)  # [R, N]
  tokens = rng.integers(1, vocab, (rows, p + n)).astype(np.int32)
  attn_mask = np.concatenate([prompt_mask, mask], axis=1)
  tokens = np.where(attn_mask > 0, tokens, 0).astype(np.int32)  # pad id 0
  adv = rng.choice([-1.0, 1.0], rows).astype(np.float32)[:, None] * mask
  return dict(tokens=tokens, attn_mask=attn_mask, targets=tokens[:, p:], mask=mask,
              advantages=adv.astype(np.float32))


def step_config(model_cfg, rows: int, chunk: int) -> ts.StepConfig:
  loss = actor_lib.LossConfig(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, agg="token-mean",
                              entropy_advantage=True, alpha=ALPHA, kappa=KAPPA)
  return ts.StepConfig(model=model_cfg, loss=loss, algorithm="grpo", group_size=rows,
                       norm_by_std=True, gamma=1.0, lam=1.0, whiten_advantages=False,
                       value_clip=0.5, epochs=1, mini_batch_size=rows, micro_batch_size=rows,
                       logit_chunk=chunk, on_nonfinite="raise")


def torch_loss(hf, b: dict) -> torch.Tensor:
  """The GRPO actor loss with the entropy advantage, written directly in PyTorch."""
  n = b["targets"].shape[1]
  # Logits at positions P-1 .. P+N-2 predict the N response tokens (the last one is dropped).
  logits = hf(input_ids=b["tokens"], attention_mask=b["attn_mask"], position_ids=b["positions"],
              logits_to_keep=n + 1).logits[:, :-1].float()  # [R, N, V]
  logp_all = torch.log_softmax(logits, dim=-1)
  logp = logp_all.gather(-1, b["targets"][..., None]).squeeze(-1)  # [R, N]
  entropy = -(logp_all.exp() * logp_all).sum(-1)
  mask = b["mask"]
  adv = torch.where(mask, b["advantages"], 0.0)
  psi = torch.minimum(ALPHA * entropy.detach().clamp_min(0.0), adv.abs() / KAPPA)
  shaped = adv + psi
  ratio = torch.exp(torch.clamp(torch.where(mask, logp - b["old_logprobs"], 0.0), -20.0, 20.0))
  per_token = torch.maximum(-shaped * ratio,
                            -shaped * torch.clamp(ratio, 1.0 - CLIP_LOW, 1.0 + CLIP_HIGH))
  return torch.where(mask, per_token, 0.0).sum() / mask.sum().clamp_min(1)


def run(name: str, steps: int, chunk: int) -> dict:
  spec = CONFIGS[name]
  rows, p, n = spec["rows"], spec["prompt"], spec["response"]
  hf, model_cfg, params = make_models(spec["model"])
  np_batch = make_batch(rows, p, n, model_cfg.vocab_size)
  cfg = step_config(model_cfg, rows, chunk)

  mesh = sharding.make_mesh((1, 1, 1))
  rules = sharding.DEFAULT_RULES
  optim = defaults.base_config().optim
  optim.lr, optim.weight_decay, optim.max_grad_norm = LR, 0.01, 1.0
  tx = train_state.make_optimizer(train_state.lr_schedule(LR, optim, 1000), optim)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shapes, specs = train_state.abstract_state(model_cfg, tx, tx, ppo=False)
    state = train_state.init_state(model_cfg, params, tx, tx, False, 0,
                                   train_state.state_shardings(shapes, specs, mesh, rules))
    batch = {k: jnp.asarray(v) for k, v in np_batch.items()}
    logp, _ = jax.jit(ts.response_logprobs, static_argnames="cfg")(
        params, batch["tokens"], batch["attn_mask"], batch["targets"], cfg=cfg)
    noise = np.random.default_rng(1).normal(0.0, 0.1, logp.shape).astype(np.float32)
    np_batch["old_logprobs"] = np.where(np_batch["mask"] > 0, np.asarray(logp) + noise, 0.0)
    batch["old_logprobs"] = jnp.asarray(np_batch["old_logprobs"], jnp.float32)

    def jax_step():
      nonlocal state
      state, metrics = ts.update(state, batch, cfg=cfg, actor_tx=tx, critic_tx=tx,
                                 train_actor=True)
      return jax.device_get(metrics)

    start = time.perf_counter()
    first = jax_step()
    jax_first_s = time.perf_counter() - start

    tb = {k: torch.as_tensor(v) for k, v in np_batch.items()}
    for k in ("tokens", "targets"):
      tb[k] = tb[k].long()
    tb["mask"] = tb["mask"].bool()
    tb["positions"] = torch.as_tensor(np.array(qwen2.positions_from_mask(batch["attn_mask"]))
                                      ).long()
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=(optim.b1, optim.b2), eps=optim.eps,
                            weight_decay=0.01, foreach=True)

    def torch_step():
      opt.zero_grad(set_to_none=True)
      loss = torch_loss(hf, tb)
      loss.backward()
      norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
      opt.step()
      return float(loss.detach()), float(norm)

    torch_loss0, torch_norm0 = torch_step()
    jax_loss0, jax_norm0 = float(first["actor/loss"]), float(first["actor/grad_norm"])
    rel = abs(jax_loss0 - torch_loss0) / max(abs(torch_loss0), 1e-12)
    rel_norm = abs(jax_norm0 - torch_norm0) / max(abs(torch_norm0), 1e-12)
    print(f"[{name}] first-step loss: jax {jax_loss0:.7f} torch {torch_loss0:.7f} (rel {rel:.1e});"
          f" grad norm: jax {jax_norm0:.6f} torch {torch_norm0:.6f} (rel {rel_norm:.1e})",
          flush=True)
    assert rel < 1e-4, f"{name}: losses differ: jax {jax_loss0} vs torch {torch_loss0}"
    assert rel_norm < 1e-3, f"{name}: grad norms differ: jax {jax_norm0} vs torch {torch_norm0}"

    jax_step()  # warm-up of both (allocator, thread pools)
    torch_step()
    jax_times, torch_times = [], []
    for _ in range(steps):  # alternate, so machine noise hits both frameworks alike
      start = time.perf_counter()
      jax_step()
      jax_times.append(time.perf_counter() - start)
      start = time.perf_counter()
      torch_step()
      torch_times.append(time.perf_counter() - start)
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  tokens = rows * (p + n)
  return dict(name=name, shape=f"{rows}x({p}+{n})", jax=tokens / jax_s, torch=tokens / torch_s,
              jax_ms=1e3 * jax_s, torch_ms=1e3 * torch_s, compile=jax_first_s - jax_s)


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def gemm_bound(name: str, steps: int) -> dict:
  """Time of the step's linear-layer matmuls alone, in each framework's own GEMM.

  Every weight [K, N] of the model (q, k, v, o, gate, up, down per layer; the output projection
  over the response tokens) is applied to the step's M tokens three times: forward x @ W, input
  gradient dy @ W^T, weight gradient x^T @ dy. The sum over the model of the median times of these
  products (jnp.dot under jit vs torch.matmul, same thread count, alternating) is what one step
  costs in matmuls if nothing else took time. The JAX step cannot be faster than its matmuls, so
  torch's step time over JAX's matmul time is the most the step's jax/torch ratio can reach. The
  attention's own batched products (QK^T, PV) are left out (small at these lengths)."""
  spec = CONFIGS[name]
  m, rows, p, n = spec["model"], spec["rows"], spec["prompt"], spec["response"]
  d, inter, layers = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
  kv = m["num_key_value_heads"] * d // m["num_attention_heads"]
  tokens = rows * (p + n)
  shapes = [(tokens, d, d, 2 * layers), (tokens, d, kv, 2 * layers),
            (tokens, d, inter, 2 * layers), (tokens, inter, d, layers),
            (rows * n, d, m["vocab_size"], 1)]  # (M, K, N, how many in the model)
  rng = np.random.default_rng(0)
  products = (jax.jit(lambda x, w, dy: x @ w), jax.jit(lambda x, w, dy: dy @ w.T),
              jax.jit(lambda x, w, dy: x.T @ dy))
  jax_s = torch_s = flops = 0.0
  for rows_m, k, cols, count in shapes:
    x, w, dy = (rng.standard_normal(shape, dtype=np.float32)
                for shape in ((rows_m, k), (k, cols), (rows_m, cols)))
    jx, jw, jdy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    tx, tw, tdy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
    torch_products = (lambda: tx @ tw, lambda: tdy @ tw.T, lambda: tx.T @ tdy)
    for jax_fn, torch_fn in zip(products, torch_products):
      jax_call = lambda f=jax_fn: f(jx, jw, jdy).block_until_ready()
      jax_call(), torch_fn()  # compile / warm up
      jt, tt = [], []
      for _ in range(steps):  # alternate, as for the whole step
        jt.append(_seconds(jax_call))
        tt.append(_seconds(torch_fn))
      jax_s += count * statistics.median(jt)
      torch_s += count * statistics.median(tt)
    flops += count * 3 * 2 * rows_m * k * cols
  return dict(jax_ms=1e3 * jax_s, torch_ms=1e3 * torch_s, gflop=flops / 1e9)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per framework")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  parser.add_argument("--logit_chunk", type=int,
                      default=defaults.base_config().rl.logit_chunk)
  parser.add_argument("--gemm", action="store_true",
                      help="also time the step's matmuls alone in each framework (the bound)")
  args = parser.parse_args()
  names = [c for c in args.configs.split(",") if c]
  unknown = [c for c in names if c not in CONFIGS]
  if unknown:
    parser.error(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
  torch.set_num_threads(args.torch_threads)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; {os.cpu_count()} CPUs; float32, GRPO + entropy advantage, "
        f"one AdamW step per call, median of {args.steps} steps")
  results = [run(name, args.steps, args.logit_chunk) for name in names]
  print(f"{'config':<7}{'rows x (P+N)':>15}{'jax tok/s':>11}{'torch tok/s':>13}{'jax/torch':>11}"
        f"{'jax ms':>9}{'torch ms':>10}{'jax compile s':>15}")
  for r in results:
    print(f"{r['name']:<7}{r['shape']:>15}{r['jax']:>11.0f}{r['torch']:>13.0f}"
          f"{r['jax'] / r['torch']:>10.2f}x{r['jax_ms']:>9.1f}{r['torch_ms']:>10.1f}"
          f"{r['compile']:>15.1f}")
  if not args.gemm:
    return
  print("\nThe step's linear-layer matmuls alone (fwd x@W, dx, dW for every weight; median of "
        f"{args.steps}); ceiling = torch step ms / jax GEMM ms, the most jax/torch can be:")
  print(f"{'config':<7}{'GFLOP':>8}{'jax GEMM ms':>13}{'torch GEMM ms':>15}{'GEMM jax/torch':>16}"
        f"{'jax GF/s':>10}{'torch GF/s':>12}{'share of step: jax':>20}{'torch':>7}{'ceiling':>9}")
  for r in results:
    g = gemm_bound(r["name"], args.steps)
    print(f"{r['name']:<7}{g['gflop']:>8.1f}{g['jax_ms']:>13.1f}{g['torch_ms']:>15.1f}"
          f"{g['torch_ms'] / g['jax_ms']:>15.2f}x{g['gflop'] / g['jax_ms'] * 1e3:>10.0f}"
          f"{g['gflop'] / g['torch_ms'] * 1e3:>12.0f}{g['jax_ms'] / r['jax_ms']:>19.0%}"
          f"{g['torch_ms'] / r['torch_ms']:>8.0%}{r['torch_ms'] / g['jax_ms']:>8.2f}x")


if __name__ == "__main__":
  main()
