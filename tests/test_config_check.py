"""The config check refuses every bad setting before any work, naming the key, its value and what
is allowed in the error's last line: a table of the settings that once failed late or silently
(issue 34's probes), through the trainer's and the evaluator's own entry points, which must write
nothing to the workdir."""

from __future__ import annotations

import math

import numpy as np
import pytest

from explore_jax.config import check, defaults
from explore_jax.evaluation import evaluate


def _tiny():
  return defaults.tiny_config("test")


# (key, bad value, a phrase of what is allowed). The tiny test config has 4 prompts x 4 samples =
# 16 rows, mini-batches of 8, micro-batches of 4.
BAD_TRAIN = [
    ("rl.mini_batch_size", 0, ">= 1"),  # was: ZeroDivisionError naming no key
    ("data.prompts_per_step", 0, ">= 1"),  # was: ZeroDivisionError
    ("rl.mini_batch_size", -8, ">= 1"),  # was: a reshape error after the first rollout
    ("rl.mini_batch_size", 12, "must divide the rollout's rows"),
    ("rl.micro_batch_size", 3, "must divide rl.mini_batch_size"),
    ("rl.epochs", 0, ">= 1"),  # was: "Need at least one array to concatenate"
    ("checkpoint_every", 0, ">= 1"),  # was: ZeroDivisionError after step 1 (the step lost)
    ("keep_checkpoints", 0, ">= 1"),  # was: every checkpoint deleted right after its write
    ("rollout.n", 0, ">= 1"),  # was: refused only after the model loaded
    ("rollout.n", 1, "GRPO compares a prompt's samples"),
    ("reward.method", "exact", "one of 'math_verify', 'dapo', 'countdown'"),
    ("optim.lr", -1e-3, "> 0"),
    ("optim.lr", math.inf, "> 0"),
    ("optim.lr", math.nan, "> 0"),
    ("optim.lr", 1e39, "below 3.4e+38"),  # finite in float64, inf in float32
    ("optim.critic_lr", 0.0, "> 0"),
    ("on_nonfinite", "ignore", "one of 'raise', 'skip'"),  # was: acted as skip
    ("total_steps", 0, ">= 1"),
    ("rl.algorithm", "dpo", "one of 'grpo', 'ppo'"),
    ("rollout.engine", "fast", "one of 'continuous', 'static', 'paged'"),
    ("rollout.page_size", 0, ">= 1"),
    ("rollout.kv_pages", -1, ">= 0"),
    ("rollout.page_attention", "flash", "one of 'auto', 'gather', 'native_cpu', 'pallas_tpu'"),
    ("rollout.top_p", 0.0, "in (0, 1]"),
    ("rl.kl_kind", "k4", "one of 'k1', 'k2', 'k3'"),
    ("model.dtype", "float64", "one of 'float32'"),
    ("data.template", "qwen", "a template of"),
    ("data.name", "dapo17k", "a dataset of explore_jax.data.NAMES"),
    ("rl.clip_c", 0.5, "0 (off) or a finite number > 1"),
    ("reward.incorrect", 2.0, "must be above reward.incorrect"),
    ("mesh.shape", (1, -1, -1), "3 integers"),
    ("data.name", "aime25", "with model.path='' (the tiny base model"),  # was: after set-up
]


def _set(config, key, value):
  *parents, leaf = key.split(".")
  for p in parents:
    config = config[p]
  config[leaf] = value


@pytest.mark.parametrize("key, value, allowed", BAD_TRAIN)
def test_trainer_refuses_before_any_work(tmp_path, key, value, allowed):
  from explore_jax.train import loop
  config = _tiny()
  _set(config, key, value)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    loop.train(config, str(workdir))
  last = str(e.value).splitlines()[-1]
  assert last.strip().startswith(key) or key in last, str(e.value)
  assert allowed in last, str(e.value)
  if key != "reward.incorrect":  # a relation names the key it refuses, with its value
    assert f"{key}={value!r}" in last or f"{key}={value}" in last, str(e.value)
  assert not workdir.exists()  # nothing written, nothing loaded


def test_every_bad_setting_is_listed_at_once():
  config = _tiny()
  config.rl.epochs = 0
  config.keep_checkpoints = 0
  found = check.problems(config, check.TRAIN_RULES, check.TRAIN_RELATIONS)
  assert [line.split("=")[0] for line in found] == ["keep_checkpoints", "rl.epochs"]


def test_the_shipped_configs_pass():
  import importlib.util
  import os
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def load(name, arg=""):
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)

  for name, arg in (("tiny_cpu.py", "size=test"), ("countdown.py", ""), ("grpo_qwen25_7b.py", ""),
                    ("ppo_qwen25_7b.py", ""), ("grpo_qwen25_math_7b.py", "")):
    check.check_train_config(load(name, arg))
  demo = load("demo.py")
  check.check_train_config(demo.train)
  check.check_eval_config(demo.eval)
  for name in ("eval_paper.py", "eval_tiny.py"):
    check.check_eval_config(load(name))


def test_a_key_without_a_rule_passes():
  config = _tiny()
  config.unlock()
  config.rl.some_future_coef = -5.0  # another issue's key: its rule comes with it
  check.check_train_config(config)


def test_generated_task_settings_are_checked():
  config = _tiny()
  config.data.synthetic.min_operands = 1
  with pytest.raises(ValueError, match=r"data\.synthetic=.*min_operands"):
    check.check_train_config(config)


BAD_EVAL = [
    ("batch_size", 0, ">= 1"),
    ("sampling.top_p", 1.5, "in (0, 1]"),
    ("sampling.max_new_tokens", 0, ">= 1"),
    ("benchmarks.synthetic.n", 0, ">= 1"),
    ("benchmarks.synthetic.reward_method", "exact", "one of 'math_verify'"),
    ("on_changed_responses", "overwrite", "one of 'raise', 'set_aside'"),
    ("reward_timeout_s", 0.0, "> 0"),
    ("engine", "fast", "one of 'continuous', 'static', 'paged'"),
    ("page_block", 0, ">= 1"),
]


@pytest.mark.parametrize("key, value, allowed", BAD_EVAL)
def test_evaluator_refuses_before_any_work(tmp_path, key, value, allowed):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "eval_tiny.py")
  spec = importlib.util.spec_from_file_location("eval_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("")
  config.model = str(tmp_path / "no_model")
  _set(config, key, value)
  with pytest.raises(ValueError) as e:
    evaluate.run(config, str(tmp_path / "eval"))
  last = str(e.value).splitlines()[-1]
  assert f"{key}={value!r}" in last and allowed in last, str(e.value)
  assert not (tmp_path / "eval").exists()


def test_prompt_length_check():
  lengths = np.array([10, 12, 14, 30])
  check.check_prompt_lengths(lengths, 30)  # all fit: silent
  with pytest.raises(ValueError) as e:
    check.check_prompt_lengths(lengths, 11)  # 3 of 4 would be cut
  assert "data.max_prompt_len=11: must be at least" in str(e.value).splitlines()[-1]
  assert "75% of the prompts" in str(e.value)


def test_prompt_length_check_warns_when_some_are_cut(caplog):
  check.check_prompt_lengths(np.array([10, 12, 14, 30]), 20)
  assert "25% of the prompts (1 of 4 looked at) are longer than data.max_prompt_len=20" in \
      caplog.text
