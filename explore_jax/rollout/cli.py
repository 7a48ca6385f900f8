"""Sample responses from a Qwen2 checkpoint with the JAX sampler and print them.

  python -m explore_jax.generate --model HF_OR_ORBAX_DIR --prompt "1 + 2 =" --n 4 \
      --temperature 0.6 --top_p 0.95 --max_new_tokens 256

The weights are read by `explore_jax.models.checkpoint.load_model` (a Hugging Face safetensors directory or
an orbax one); the tokenizer by `transformers.AutoTokenizer` from --tokenizer (default: --model).
Prompts are encoded as given (no chat template) and left-padded into one batch; each response is
printed (without the prompt) up to and without its EOS token, under a header line.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from explore_jax import rollout as rollout_lib
from explore_jax.models import checkpoint
from explore_jax.rollout import sampling


def encode_left_padded(tokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and mask [B, P], padded on the left (the sampler's layout)."""
  ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
  empty = [i for i, x in enumerate(ids) if not x]
  if empty:
    raise ValueError(f"--prompt number(s) {empty} encode to no tokens")
  return sampling.left_pad(ids, 0)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="Hugging Face or orbax checkpoint directory")
  parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
  parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  parser.add_argument("--n", type=int, default=1, help="samples per prompt")
  parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--max_new_tokens", type=int, default=256)
  parser.add_argument("--eos_id", type=int, default=None,
                      help="default: the tokenizer's eos token, else config.eos_token_id")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  import transformers  # imported late: it is slow and only the CLI needs it
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
  config, params = checkpoint.load_model(args.model)
  eos_id = args.eos_id
  if eos_id is None:
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
  if eos_id is None:
    raise ValueError(f"{args.model}: neither the tokenizer nor config.json names an EOS token; "
                     "pass --eos_id")
  tokens, mask = encode_left_padded(tokenizer, args.prompt)
  start = time.perf_counter()
  rollout = rollout_lib.generate(config, params, tokens, mask, jax.random.key(args.seed),
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, eos_id=eos_id, n=args.n)
  out_tokens, lengths, finish = jax.device_get(
      (rollout.tokens, rollout.lengths, rollout.finish_reason))
  seconds = time.perf_counter() - start
  for row in range(out_tokens.shape[0]):
    prompt_index, sample = divmod(row, args.n)
    ids = out_tokens[row, :lengths[row]].tolist()
    if finish[row] == sampling.FINISH_EOS:
      ids = ids[:-1]
    reason = "eos" if finish[row] == sampling.FINISH_EOS else "length"
    print(f"=== prompt {prompt_index} sample {sample} ({lengths[row]} tokens, {reason})")
    print(tokenizer.decode(ids, skip_special_tokens=False))
  print(f"# {int(lengths.sum())} tokens in {seconds:.2f} s (compilation included)", file=sys.stderr)
