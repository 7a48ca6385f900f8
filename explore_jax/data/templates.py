"""Prompt templates, chosen by name in the config.

  qwen_math   problem + the Qwen2.5-Math suffix (answer in \\boxed{}; grade with math_verify)
  dapo        the DAPO-Math-17k wrapper (answer on an "Answer:" line; grade with dapo)
  plain       the problem as it is
  synthetic   the problem and a newline: the tiny model's pre-training format
  countdown   the same, for the countdown task (its answer is an expression: grade with countdown)
  chat        the tokenizer's chat template around `qwen_math`; "chat:NAME" wraps template NAME
"""

from __future__ import annotations

QWEN_MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
               "to the problem.\n\n")
DAPO_SUFFIX = "\n\nRemember to put your answer on its own line after \"Answer:\"."

_TEXT_TEMPLATES = {
    "qwen_math": lambda p: p + QWEN_MATH_SUFFIX,
    "dapo": lambda p: DAPO_PREFIX + p + DAPO_SUFFIX,
    "plain": lambda p: p,
    "synthetic": lambda p: p + "\n",
    "countdown": lambda p: p + "\n",
}
NAMES = tuple(_TEXT_TEMPLATES) + ("chat",)

# Which reward method reads the answer format a template asks for.
REWARD_METHOD = {"qwen_math": "math_verify", "dapo": "dapo", "plain": "math_verify",
                 "synthetic": "math_verify", "countdown": "countdown"}


def _split(name: str) -> tuple[bool, str]:
  if name == "chat":
    return True, "qwen_math"
  if name.startswith("chat:"):
    return True, name[len("chat:"):]
  return False, name


def apply_template(name: str, problem: str, tokenizer=None) -> str:
  """The prompt text for `problem` under template `name` (see the module docstring)."""
  chat, inner = _split(name)
  if inner not in _TEXT_TEMPLATES:
    raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(NAMES)}, chat:NAME")
  text = _TEXT_TEMPLATES[inner](problem)
  if not chat:
    return text
  if tokenizer is None or not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"template {name!r} needs a tokenizer with a chat template")
  return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)


def reward_method(name: str) -> str:
  """The `rewards.score` method matching the answer format of template `name`."""
  return REWARD_METHOD[_split(name)[1]]
