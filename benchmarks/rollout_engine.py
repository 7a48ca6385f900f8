"""Static sampler vs continuous and paged engines (and transformers `generate`) on RL-like lengths.

  .venv/bin/python benchmarks/rollout_engine.py                  # every setting, with transformers
  .venv/bin/python benchmarks/rollout_engine.py --no_hf --rows 128
  .venv/bin/python benchmarks/rollout_engine.py --no_hf --settings tiny  # the paged engine's target

Model: a random Qwen2 (vocab 96, width 128, 4 layers, 4 q / 2 kv heads, MLP 384) whose EOS column
of the output head is zero: at temperature 1 every other logit is near 0 too, so each step ends a
row with probability about 1/96 and response lengths are geometric (median ~1/8 of the 512-token
cap, the longest rows reaching it), long-tailed like RL rollouts. A second setting has no EOS
(fixed lengths). Both JAX engines sample the same tokens (same rng, per-row keys), so they count
the same tokens (in bf16 a near-tie can flip a row: tok/s counts each engine's own tokens and the
ratios are per token); the static one runs in waves of `slots` rows (equal KV-cache memory).
Timing: after a first call (compile), `--repeats` rounds in which every engine runs once, in
turn; tokens/s = generated tokens / the median round's seconds, "vs static" = the median (and the
range) of the rounds' static / engine time ratios; compile = first call minus the median call;
utilization = decode slot-steps that produced a token / slot-steps run; KV memory from the cache
shapes (the engine adds its prefill pool of 2 x ceil(slots / n) prompts); KV read / filled = KV
positions the continuous engine's decode attention read over those it would read attending each
row's filled length only (1.0: the ragged read's ideal).

The paged engine (`explore_jax.rollout.paged`) runs at equal KV memory: `slots` x (P + N)
positions in pages of `--page_size`, through `--paged_slots` slots (default 4 x slots; `tiny`:
a slot for each of its 128 rows, the pool bounding them). Its KV
read / filled counts what the Pallas kernels read (each live row's pages in blocks of 2 pages);
beside it, the read it ran (`native_cpu`, the native kernel, or `gather`, the pure-JAX gather:
`--page_attention`) and what that read. It also prints its peak pages in use,
preemptions and host round trips (device calls), and its time against each continuous engine's
in the same rounds.

`tiny` is the paged engine's target setting: a random tiny model (vocabulary 64, width 64, 2
layers, 4 q / 2 kv heads, MLP 192) with a zeroed EOS column (geometric lengths, mean ~64), prompts
of 8 tokens, cap 384, 32 prompts x 4 samples, 16 slots (static: waves of 16 rows), pages of 16;
no transformers twin.

`--preset qwen2.5-0.5b` (for a GPU: `benchmarks/gpu.sh` runs it) swaps the tiny model for that
preset's layers and heads in bf16, random weights from `qwen2.init_params`, with the same
96-token vocabulary and zeroed EOS row (tied embeddings: after 24 random layers the logits are
about as flat, so the lengths are about as long-tailed); no transformers twin.

A third setting runs the demo's trained model (`make demo` writes runs/demo; `--demo_model DIR`
for another) on held-out countdown problems, sampled as the demo evaluates (configs/demo.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from explore_jax import rollout as rollout_lib
from explore_jax.models import checkpoint, qwen2
from explore_jax.rollout import engine as rollout_engine
from explore_jax.rollout import sampling

SPEC = dict(vocab_size=96, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2)
EOS, PROMPT = 3, 32
# The paged engine's target setting (`tiny`).
TINY_SPEC = dict(vocab_size=64, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
TINY = dict(prompts=32, n=4, prompt=8, new=384, slots=16, paged_slots=128)  # a slot for every row
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO, "runs", "demo", "models", "entropy_adv_s0")


def _models():
  import torch
  import transformers
  torch.manual_seed(0)
  hcfg = transformers.Qwen2Config(**SPEC, max_position_embeddings=2048, tie_word_embeddings=False,
                                  bos_token_id=None, eos_token_id=EOS, pad_token_id=0)
  hf = transformers.Qwen2ForCausalLM(hcfg).float().eval()
  with torch.no_grad():
    hf.lm_head.weight[EOS] = 0.0
  cfg, params = checkpoint.from_hf_model(hf)
  return hf, cfg, jax.device_put(params)


def _preset_model(name):
  """(None, cfg, params): the preset's layers in bf16 with the benchmark's vocabulary, random
  weights, the EOS row of the (tied) output head zeroed."""
  cfg = qwen2.preset(name, vocab_size=SPEC["vocab_size"], param_dtype="bfloat16", dtype="bfloat16")
  params = jax.jit(lambda r: qwen2.init_params(cfg, r))(jax.random.key(0))
  model = params["model"]
  params["model"] = {**model, "embed_tokens": model["embed_tokens"].at[EOS].set(0)}
  if "lm_head" in params:
    params["lm_head"] = params["lm_head"].at[:, EOS].set(0)
  return None, cfg, params


def _kv_bytes(cfg, rows, length):
  per_slot = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
  return rows * length * per_slot * jnp.dtype(cfg.dtype).itemsize


def _drain_bound(lengths, slots):
  """The slot utilization of an ideal continuous engine on these rows (row order kept, each slot
  refilled at the very step its row ends): what the final drain alone allows."""
  free = np.zeros(slots)
  for length in lengths:  # each row's l - 1 decode steps go to the slot that frees first
    i = int(np.argmin(free))
    free[i] += length - 1
  return float(np.sum(np.asarray(lengths) - 1) / (slots * free.max()))


def _rounds(fns: dict, repeats: int):
  """Each fn's output, compile seconds (first call minus the median warm call) and warm seconds
  per round: the engines run in turn, `repeats` rounds, so that a slow spell of this shared
  machine falls on all of them (ratios are taken within a round)."""
  out, first, warm = {}, {}, {k: [] for k in fns}
  for k, fn in fns.items():
    start = time.perf_counter()
    out[k] = fn()
    first[k] = time.perf_counter() - start
  for _ in range(repeats):
    for k, fn in fns.items():
      start = time.perf_counter()
      fn()
      warm[k].append(time.perf_counter() - start)
  warm = {k: np.asarray(v) for k, v in warm.items()}
  return out, {k: first[k] - float(np.median(warm[k])) for k in fns}, warm


@dataclasses.dataclass
class Setting:
  """One benchmark setting: a model (JAX and its transformers twin), left-padded prompts, how
  they are sampled."""
  name: str
  hf: object
  cfg: object
  params: object
  prompts: np.ndarray  # [prompts, width], left-padded
  mask: np.ndarray
  new: int  # max new tokens
  eos: int
  temperature: float = 1.0
  top_p: float = 1.0


def _tiny_model():
  """(None, cfg, params): the `tiny` setting's random model, its EOS column zeroed."""
  cfg = qwen2.Qwen2Config(**TINY_SPEC, rope_theta=1e4)
  params = qwen2.init_params(cfg, jax.random.key(0))
  params["lm_head"] = params["lm_head"].at[:, EOS].set(0)
  return None, cfg, params


def _pages(s: Setting, slots: int, page_size: int) -> int:
  """Pages of the bytes of `slots` contiguous rows of P + N positions."""
  return slots * (s.prompts.shape[1] + s.new) // page_size


def _rows_of_stats(st) -> str:
  """A printed row's extra columns (continuous: KV read / filled, chunks; paged: also its read's
  name and what it read, peak pages, preemptions)."""
  if st is None:
    return ""
  extra = f"{st['kv_read_over_filled']:>15.2f}x{st['chunks']:>8}"
  if "peak_pages" in st:
    extra += (f"   {st['page_attention']} {st['kv_own_read_over_filled']:.2f}x, peak "
              f"{st['peak_pages']:.0f} of "
              f"{st['kv_pages']} pages, {st['preemptions']:.0f} preempted")
  return extra


def _transformers_tps(s: Setting, n: int, wave: int) -> float:
  """Generated tokens/s of the transformers twin, sampled in the static engine's waves."""
  import torch
  width = s.prompts.shape[1]
  hf_tokens, t_hf = 0, 0.0
  torch.manual_seed(0)
  for first in range(0, s.prompts.shape[0], wave):
    ids = torch.tensor(np.repeat(s.prompts[first:first + wave], n, axis=0)).long()
    mask = torch.tensor(np.repeat(s.mask[first:first + wave], n, axis=0)).long()
    start = time.perf_counter()
    with torch.no_grad():
      hf_out = s.hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                             top_p=s.top_p, temperature=s.temperature, max_new_tokens=s.new,
                             eos_token_id=s.eos if s.eos >= 0 else None, pad_token_id=0,
                             min_new_tokens=s.new if s.eos < 0 else 0)
    t_hf += time.perf_counter() - start
    gen = hf_out[:, width:].numpy()
    if s.eos >= 0:  # tokens up to and including the first EOS
      hit = gen == s.eos
      hf_tokens += int(np.where(hit.any(1), hit.argmax(1) + 1, gen.shape[1]).sum())
    else:
      hf_tokens += gen.size
  return hf_tokens / t_hf


def run(s: Setting, n, slots, chunk, repeats, with_hf, kv_blocks, refill_share, paged_slots=(),
        page_size=16, page_attention=("auto",)):
  b = s.prompts.shape[0]
  wave = slots // n  # static: prompts per wave, so that both hold `slots` rows of cache
  kw = dict(max_new_tokens=s.new, temperature=s.temperature, top_p=s.top_p, eos_id=s.eos, n=n,
            with_stats=True)

  def static():
    outs, busy, steps, count = [], 0, 0, 0
    for first in range(0, b, wave):
      part = slice(first, first + wave)
      r, st = rollout_lib.generate(s.cfg, s.params, s.prompts[part], s.mask[part],
                                   jax.random.key(0), prompt_index=np.arange(first, first + wave),
                                   **kw)
      outs.append(np.asarray(r.tokens))
      count += int(np.asarray(r.lengths).sum())
      busy, steps = busy + int(st["busy_slot_steps"]), steps + int(st["slot_steps"])
    return np.concatenate(outs), busy / steps, count

  def continuous(kv_block):
    r, st = rollout_lib.generate(s.cfg, s.params, s.prompts, s.mask, jax.random.key(0),
                                 engine="continuous", slots=slots, chunk=chunk, kv_block=kv_block,
                                 refill_share=refill_share, **kw)
    return np.asarray(r.tokens), np.asarray(r.lengths), st

  pages = _pages(s, slots, page_size)

  def paged(engine_slots, attention):
    r, st = rollout_lib.generate(s.cfg, s.params, s.prompts, s.mask, jax.random.key(0),
                                 engine="paged", slots=engine_slots, kv_pages=pages,
                                 page_size=page_size, page_attention=attention, **kw)
    return np.asarray(r.tokens), np.asarray(r.lengths), st

  names = {kv_block: f"cont. ragged {kv_block}" if kv_block else "cont. segmented"
           for kv_block in kv_blocks}
  paged_names = {(k, a): f"paged {k} slots" + (f" {a}" if len(page_attention) > 1 else "")
                 for k in paged_slots for a in page_attention}
  fns = {"static": static, **{names[kv]: functools.partial(continuous, kv) for kv in kv_blocks},
         **{name: functools.partial(paged, *key) for key, name in paged_names.items()}}
  out, compile_s, warm = _rounds(fns, repeats)
  s_tokens, s_util, s_count = out["static"]
  width = s.prompts.shape[1]
  length = width + s.new
  f = -(-slots // n)
  c_len = out[names[kv_blocks[0]]][1]
  tokens = int(c_len.sum())
  # name, tok/s (median round), vs static (median and range of the rounds' ratios), util, KV, ...
  ratio = lambda name: warm["static"] / warm[name]
  rows = [("static", s_count / np.median(warm["static"]), (1.0, 1.0, 1.0), s_util,
           _kv_bytes(s.cfg, slots, length), compile_s["static"], None)]
  same, per_token = {}, {}
  engines = ([(names[kv], _kv_bytes(s.cfg, slots, length) + _kv_bytes(s.cfg, 2 * f, width))
              for kv in kv_blocks]
             + [(name, _kv_bytes(s.cfg, pages, page_size)) for name in paged_names.values()])
  for name, kv_bytes in engines:
    e_tokens, e_len, st = out[name]
    count = int(e_len.sum())
    per_token[name] = warm[name] / count  # seconds per token, each round
    r = ratio(name) * count / s_count  # per token: in bf16 a near-tie can flip a row
    rows.append((name, count / np.median(warm[name]), (np.median(r), r.min(), r.max()),
                 st["slot_utilization"], kv_bytes, compile_s[name], st))
    same[name] = float(np.mean(np.all(s_tokens == e_tokens, axis=1)))
  if with_hf:
    hf_tps = _transformers_tps(s, n, wave)
    rows.append(("transformers", hf_tps, (hf_tps / rows[0][1],) * 3, float("nan"),
                 _kv_bytes(s.cfg, slots, length), float("nan"), None))
  print(f"\n{s.name}: {b} prompts x n={n} = {b * n} rows, {slots} slots, cap {s.new}, chunk "
        f"{chunk}, refill share {refill_share}, temperature {s.temperature}, top-p {s.top_p}; "
        f"{repeats} rounds; response lengths median {np.median(c_len):.0f}, max {c_len.max()}, "
        f"{tokens} tokens; rows identical to the static engine's: "
        + ", ".join(f"{k} {v:.0%}" for k, v in same.items())
        + f"; the drain allows a slot utilization of {_drain_bound(c_len, slots):.2f}")
  print(f"{'engine':<20}{'tok/s':>8}{'vs static (range)':>22}{'slot util':>11}{'KV MiB':>8}"
        f"{'compile s':>11}{'KV read/filled':>16}{'chunks':>8}")
  for name, tps, (mid, lo, hi), util, kv, comp, st in rows:
    spread = f"{mid:.2f}x ({lo:.2f}-{hi:.2f})" if lo != hi else f"{mid:.2f}x"
    print(f"{name:<20}{tps:>8.0f}{spread:>22}{util:>11.2f}{kv / 2**20:>8.1f}"
          f"{comp:>11.1f}{_rows_of_stats(st)}", flush=True)
  for p_name in paged_names.values():  # per token, round by round
    for c_name in names.values():
      r = per_token[c_name] / per_token[p_name]
      print(f"{p_name} vs {c_name}: {np.median(r):.2f}x ({r.min():.2f}-{r.max():.2f})")


def demo_setting(model_dir: str, problems: int) -> Setting:
  """The demo's trained model (runs/demo of `make demo`) on held-out countdown problems, sampled
  as the demo's evaluation samples them (configs/demo.py: temperature 0.6, top-p 0.95, its cap)."""
  import importlib.util
  import transformers
  from explore_jax import data
  from explore_jax.data import templates
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs",
                                                                              "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  ev = module.get_config(None).eval
  bench = ev.benchmarks.heldout
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  recs = list(data.load(bench.dataset, bench.split,
                        **data.generated_task_configs(ev.synthetic, ev.countdown)))[:problems]
  ids = [tokenizer.encode(templates.apply_template(bench.template, r["problem"]),
                          add_special_tokens=False) for r in recs]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  width = -(-max(map(len, ids)) // ev.prompt_bucket) * ev.prompt_bucket
  prompts, mask = sampling.left_pad(ids, pad, width)
  hf = transformers.Qwen2ForCausalLM.from_pretrained(model_dir).float().eval()
  cfg, params = checkpoint.load_model(model_dir)
  return Setting(f"demo model ({model_dir}), countdown", hf, cfg, jax.device_put(params),
                 np.asarray(prompts), np.asarray(mask), ev.sampling.max_new_tokens,
                 tokenizer.eos_token_id, ev.sampling.temperature, ev.sampling.top_p)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=256, help="prompts x n")
  parser.add_argument("--n", type=int, default=8)
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--chunk", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed rounds (every engine once per round, after a warm-up call)")
  parser.add_argument("--no_hf", action="store_true")
  parser.add_argument("--kv_blocks", default="0,32,64",
                      help="engine decode attention: 0 = segmented view, B = ragged, B-slot blocks")
  parser.add_argument("--refill_share", type=float, default=rollout_engine.REFILL_SHARE,
                      help="a chunk ends early once this share of the slots is free")
  parser.add_argument("--settings", default="long-tailed,fixed,demo,tiny",
                      help="which settings to run (comma-separated)")
  parser.add_argument("--paged_slots", default="",
                      help="paged engine slots, comma-separated ('' = 4 x slots; 0 = no paged)")
  parser.add_argument("--page_size", type=int, default=16)
  parser.add_argument("--page_attention", default="auto",
                      help="paged engine attention, comma-separated: auto, gather, pallas_tpu, "
                      "pallas_gpu")
  parser.add_argument("--preset", default="",
                      help="a qwen2 preset's layers (bf16, random, 96-token vocabulary) instead of "
                      "the tiny model; no transformers row")
  parser.add_argument("--demo_model", default=DEMO_MODEL,
                      help="HF directory of a model trained by the demo ('': skip that setting)")
  args = parser.parse_args()
  hf, cfg, params = _preset_model(args.preset) if args.preset else _models()
  with_hf = hf is not None and not args.no_hf
  prompts = np.random.default_rng(0).integers(4, SPEC["vocab_size"], (args.rows // args.n,
                                                                       PROMPT)).astype(np.int32)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}); "
        f"{args.preset + ' layers, ' if args.preset else ''}{cfg.dtype}; ratios are more telling "
        "than absolute figures on a shared machine")
  kv_blocks = [int(x) for x in args.kv_blocks.split(",")]
  paged_of = lambda default: ([int(x) for x in args.paged_slots.split(",") if int(x)]
                              if args.paged_slots else [default])
  paged_kw = dict(page_size=args.page_size, page_attention=tuple(args.page_attention.split(",")))
  mask = np.ones_like(prompts)
  settings = args.settings.split(",")
  for name, new, eos in (("long-tailed", 512, EOS), ("fixed", 128, sampling.NO_EOS)):
    if name not in settings:
      continue
    run(Setting(name, hf, cfg, params, prompts, mask, new, eos), args.n, args.slots, args.chunk,
        args.repeats, with_hf, kv_blocks, args.refill_share, paged_of(4 * args.slots), **paged_kw)
  if "tiny" in settings:
    _, tiny_cfg, tiny_params = _tiny_model()
    tiny_prompts = np.random.default_rng(0).integers(
        4, TINY_SPEC["vocab_size"], (TINY["prompts"], TINY["prompt"])).astype(np.int32)
    run(Setting("tiny (the paged engine's target)", None, tiny_cfg, tiny_params, tiny_prompts,
                np.ones_like(tiny_prompts), TINY["new"], EOS), TINY["n"], TINY["slots"],
        args.chunk, args.repeats, False, kv_blocks, args.refill_share, paged_of(TINY["paged_slots"]),
        **paged_kw)
  if not args.demo_model or "demo" not in settings:
    return
  if not os.path.exists(args.demo_model):
    print(f"\ndemo model: {args.demo_model} does not exist (`make demo` writes it); skipped")
    return
  run(demo_setting(args.demo_model, args.rows // args.n), args.n, args.slots, args.chunk,
      args.repeats, not args.no_hf, kv_blocks, args.refill_share, paged_of(4 * args.slots),
      **paged_kw)


if __name__ == "__main__":
  main()
