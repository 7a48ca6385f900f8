"""Is this checkpoint read right? explore_jax's logits against transformers' on a few prompts.

The tests check the conversion on tiny random models; a user's own checkpoint (a released Qwen2.5,
a fine-tune saved by another tool) may differ in ways a tiny model does not show: a config field
read differently, a tensor layout, a tokenizer. `compare` loads the directory both ways (the JAX
model through `checkpoint.load_hf`, transformers' `AutoModelForCausalLM` in PyTorch), runs each
prompt through both without padding, and reports the largest |logit difference| and the share
of positions whose most likely next token agrees. `python -m explore_jax.convert check` prints
it and turns it into an exit status. It needs torch (in the test extra, not the runtime deps).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from explore_jax.config.cli import UserError

PROMPTS = (
    "Find the sum of all positive integers n such that n^2 - 19n + 99 is a perfect square.",
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer.\n\nWhat is 17 * 23?",
    "<|im_start|>user\nIf 3x + 5 = 20, what is x?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)


@dataclasses.dataclass(frozen=True)
class Report:
  max_abs_diff: float  # over every position of every prompt and every vocabulary entry
  argmax_agreement: float  # share of positions whose argmax agrees
  tokens: int  # positions compared
  per_prompt: list[tuple[str, float, float]]  # (prompt, max |diff|, agreement)


def compare(hf_dir: str, tokenizer_dir: str, prompts: list[str], dtype: str = "float32"
            ) -> Report:
  """The comparison of `hf_dir`'s two readings (module docstring), both models in `dtype`."""
  try:
    import torch
  except ImportError:
    raise UserError("convert check needs torch (pip install torch) for transformers' "
                    "reference model") from None
  import jax.numpy as jnp
  import transformers

  from explore_jax.models import checkpoint, qwen2

  if not logging.getLogger("transformers").isEnabledFor(logging.INFO):  # quiet unless --verbose
    transformers.utils.logging.disable_progress_bar()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  config, params = checkpoint.load_hf(hf_dir, dtype)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
  ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:config.max_position_embeddings]
         for text in prompts]
  empty = [text for text, row in zip(prompts, ids) if not row]
  if empty:
    raise UserError(f"--prompt {empty[0]!r} encodes to no tokens")
  # One right-padded batch [P, T]: one compile, and with causal attention a real token never
  # sees the padding after it, so both models' positions are 0..len-1 as in separate calls.
  width = max(map(len, ids))
  tokens = np.zeros((len(ids), width), np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, row in enumerate(ids):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
  ours = np.asarray(qwen2.forward(params, jnp.asarray(tokens), config, jnp.asarray(mask)),
                    np.float32)  # [P, T, V]
  with torch.no_grad():
    theirs = reference(torch.as_tensor(tokens, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask)).logits.float().numpy()
  rows, agree = [], []
  for i, (text, row) in enumerate(zip(prompts, ids)):
    a, b = ours[i, :len(row)], theirs[i, :len(row)]  # [T_i, V]: the prompt's own positions
    same = a.argmax(-1) == b.argmax(-1)
    rows.append((text, float(np.max(np.abs(a - b))), float(same.mean())))
    agree.append(same)
  agree_all = np.concatenate(agree)
  return Report(max(r[1] for r in rows), float(agree_all.mean()), int(agree_all.size), rows)
