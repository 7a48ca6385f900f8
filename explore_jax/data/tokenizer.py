"""A tiny byte-level BPE tokenizer in Hugging Face format, for the CPU default model.

Byte-level, so every string (any template, any Unicode) encodes and decodes back exactly; digits
are split one per token (a pre-tokenizer rule), so the model sees numbers digit by digit, which is
what lets a few-million-parameter model learn carrying. The merges are learned from the synthetic
task's texts and the prompt templates, so those cost few tokens. Special tokens follow Qwen2:
`<|endoftext|>` (pad and eos), `<|im_start|>`, `<|im_end|>`, with a Qwen-style chat template.
"""

from __future__ import annotations

import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
import transformers

from explore_jax.data import synthetic, templates

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus(num_examples: int) -> list[str]:
  records = synthetic.generate("train", num_examples)
  texts = [templates.apply_template("synthetic", r["problem"]) + r["solution"] for r in records]
  texts += [templates.apply_template(n, "Compute 1 + 2.") for n in ("qwen_math", "dapo")]
  return texts + ["<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n"]


def build_tiny_tokenizer(path: str, vocab_size: int = 384, num_examples: int = 2000,
                         extra_texts=()) -> transformers.PreTrainedTokenizerFast:
  """Train, save to `path` (tokenizer.json + tokenizer_config.json) and return the tokenizer.
  `extra_texts` (another task's prompts and responses) join the corpus the merges are learnt
  from."""
  if not 256 + len(SPECIAL_TOKENS) < vocab_size <= 512:
    raise ValueError(f"vocab_size must be in ({256 + len(SPECIAL_TOKENS)}, 512], got {vocab_size}")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(num_examples) + list(extra_texts), trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
      clean_up_tokenization_spaces=False)
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(path)
  return fast


def load(path: str):
  """`transformers.AutoTokenizer.from_pretrained(path)`, with errors that name the directory: a
  garbled tokenizer.json otherwise raises a bare JSONDecodeError. (transformers' own OSError for
  a missing tokenizer names it already.)"""
  try:
    return transformers.AutoTokenizer.from_pretrained(path)
  except OSError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: the tokenizer files could not be read ({type(e).__name__}: "
                     f"{str(e)[:300]})") from e
