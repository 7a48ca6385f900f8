"""Generated tokens/s of `explore_jax.rollout.generate` vs transformers' `generate`, same weights.

  .venv/bin/python benchmarks/sampler.py                 # both configs
  .venv/bin/python benchmarks/sampler.py --configs a --repeats 3

Both sample at temperature 1 with top-p 0.95 in float32 on the same random Qwen2 weights and
prompts, and both produce exactly max_new_tokens per row (no EOS: `eos_id=NO_EOS` here, no
eos_token_id there), so the token counts are equal. Tokens/s = batch * new tokens / seconds of
a warm call (the best of --repeats); the JAX compile time (first call minus a warm call) is
printed separately. The two configs of issue 3:
  (a) tiny: vocab 512, width 128, 4 layers, 4 q / 2 kv heads, batch 64, prompt 32, 128 new tokens
  (b) compute-bound: vocab 32k, width 512, 8 layers, 8 q / 2 kv heads, MLP 1536, prompt 32,
      128 new tokens, batch 16 by default (--batch_b) so that it runs in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
import transformers

from explore_jax import rollout as rollout_lib
from explore_jax.models import checkpoint
from explore_jax.rollout import sampling

CONFIGS = {
    "a": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, batch=64),
    "b": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, batch=16),
}
PROMPT, NEW, TOP_P = 32, 128, 0.95


def _models(spec):
  torch.manual_seed(0)
  hcfg = transformers.Qwen2Config(**{k: v for k, v in spec.items() if k != "batch"},
                                  max_position_embeddings=1024, tie_word_embeddings=False,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
  hf = transformers.Qwen2ForCausalLM(hcfg).float().eval()
  hf.generation_config.eos_token_id = None
  cfg, params = checkpoint.from_hf_model(hf)
  return hf, cfg, jax.device_put(params)


def _best(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def run(name: str, batch: int, repeats: int) -> dict:
  spec = dict(CONFIGS[name], batch=batch)
  hf, cfg, params = _models(spec)
  prompts = np.random.default_rng(0).integers(1, spec["vocab_size"], (batch, PROMPT)).astype(
      np.int32)
  mask = np.ones_like(prompts)

  def ours():
    r = rollout_lib.generate(cfg, params, prompts, mask, jax.random.key(0), max_new_tokens=NEW,
                             temperature=1.0, top_p=TOP_P, eos_id=sampling.NO_EOS)
    r.tokens.block_until_ready()
    assert int(r.lengths.min()) == NEW
    return r

  start = time.perf_counter()
  ours()
  first = time.perf_counter() - start
  t_jax = _best(ours, repeats)

  ids, att = torch.tensor(prompts).long(), torch.tensor(mask).long()

  def theirs(new=NEW):
    with torch.no_grad():
      out = hf.generate(input_ids=ids, attention_mask=att, do_sample=True, top_p=TOP_P, top_k=0,
                        temperature=1.0, max_new_tokens=new, min_new_tokens=new)
    assert out.shape[1] == PROMPT + new, out.shape

  theirs(4)  # warm-up: thread pools, allocator
  t_hf = _best(theirs, repeats)
  tokens = batch * NEW
  return dict(name=name, batch=batch, jax=tokens / t_jax, hf=tokens / t_hf, compile=first - t_jax)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="ab")
  parser.add_argument("--batch_b", type=int, default=CONFIGS["b"]["batch"])
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}; float32, temperature 1, top-p {TOP_P}, "
        f"prompt {PROMPT}, {NEW} new tokens")
  print(f"{'config':<8}{'batch':>6}{'explore_jax tok/s':>19}{'transformers tok/s':>20}"
        f"{'ratio':>8}{'jax compile s':>15}")
  for name in args.configs:
    batch = args.batch_b if name == "b" else CONFIGS[name]["batch"]
    r = run(name, batch, args.repeats)
    print(f"{r['name']:<8}{r['batch']:>6}{r['jax']:>19.0f}{r['hf']:>20.0f}"
          f"{r['jax'] / r['hf']:>7.1f}x{r['compile']:>15.1f}", flush=True)


if __name__ == "__main__":
  main()
