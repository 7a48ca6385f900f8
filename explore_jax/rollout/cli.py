"""Sample responses from a Qwen2 checkpoint with the JAX sampler and print them.

  python -m explore_jax.generate --model Qwen/Qwen2.5-0.5B --prompt "1 + 2 =" --n 4 \
      --temperature 0.6 --top_p 0.95 --max_new_tokens 256 [--chat] [--dtype bfloat16]

--model is a Hugging Face safetensors directory, an orbax one (`explore_jax.models.checkpoint.
load_model`), a gs:// directory or a hub id ORG/NAME[@REV] (fetched into the hub cache:
`explore_jax.models.hub`); the tokenizer is `transformers.AutoTokenizer`'s, from --tokenizer
(default: --model's). The weights are loaded in --dtype, by default the checkpoint's own
(config.json's torch_dtype: a bf16 checkpoint samples in bf16). Prompts are encoded as given, or
inside the tokenizer's chat template with --chat (a user message, then the assistant's turn), and
left-padded into one batch; each response is printed (without the prompt) up to and without its
EOS token, under a header line.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from explore_jax import rollout as rollout_lib
from explore_jax.config import cli as cli_lib
from explore_jax.models import checkpoint
from explore_jax.models import files as model_files
from explore_jax.rollout import sampling

DTYPES = ("float32", "bfloat16", "float16")


def encode_left_padded(tokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and mask [B, P], padded on the left (the sampler's layout)."""
  ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
  empty = [i for i, x in enumerate(ids) if not x]
  if empty:
    raise ValueError(f"--prompt number(s) {empty} encode to no tokens")
  return sampling.left_pad(ids, 0)


def chat_prompts(tokenizer, prompts: list[str], what: str = "--chat") -> list[str]:
  """Each prompt as a user message in the tokenizer's chat template, ending where the assistant
  starts; an error naming `what` when the tokenizer has no template."""
  if not getattr(tokenizer, "chat_template", None):
    raise cli_lib.BadValue(f"{what}: the tokenizer ({tokenizer.name_or_path}) has no chat "
                           "template")
  return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                        add_generation_prompt=True) for p in prompts]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True,
                      help="HF or orbax directory (local or gs://), or hub id ORG/NAME[@REV]")
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer directory or hub id (default: --model's)")
  parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  parser.add_argument("--chat", action="store_true",
                      help="wrap each prompt in the tokenizer's chat template")
  parser.add_argument("--dtype", choices=DTYPES, default=None,
                      help="weights and compute dtype (default: the checkpoint's own)")
  parser.add_argument("--n", type=int, default=1, help="samples per prompt")
  parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--max_new_tokens", type=int, default=256)
  parser.add_argument("--eos_id", type=int, default=None,
                      help="default: the tokenizer's eos token, else config.eos_token_id")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--verbose", action="store_true", help="third-party INFO logs too")
  args = parser.parse_args(argv)
  cli_lib.quiet_logs(args.verbose)
  cli_lib.run_main(lambda: generate(args))


def generate(args: argparse.Namespace) -> None:
  import transformers  # imported late: it is slow and only the CLI needs it
  model_dir = model_files.local_dir(args.model, "--model")
  tokenizer_dir = (model_files.local_dir(args.tokenizer, "--tokenizer", kind="tokenizer")
                   if args.tokenizer else model_dir)
  checkpoint.check_tokenizer_dir(tokenizer_dir, "--tokenizer" if args.tokenizer else "--model")
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  dtype = args.dtype or checkpoint.saved_dtype(model_dir)
  config, params = checkpoint.load_model(model_dir, dtype=dtype)
  config = config.replace(dtype=dtype)
  eos_id = args.eos_id
  if eos_id is None:
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
  if eos_id is None:
    raise cli_lib.BadValue(f"{args.model}: neither the tokenizer nor config.json names an EOS "
                           "token; pass --eos_id")
  prompts = chat_prompts(tokenizer, args.prompt) if args.chat else args.prompt
  tokens, mask = encode_left_padded(tokenizer, prompts)
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
  print(f"# {int(lengths.sum())} tokens in {seconds:.2f} s ({dtype}, compilation included)",
        file=sys.stderr)
