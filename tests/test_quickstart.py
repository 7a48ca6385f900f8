"""docs/quickstart.md's commands, run as written against a hub cache that holds Qwen/Qwen2.5-0.5B.

The model is Qwen2.5-0.5B's shape (width 896, MLP 4864, 14 query / 2 kv heads, its 151,936-token
vocabulary, tied embeddings, rope_theta 1e6, bf16 weights as released) with random weights and 2
layers instead of 24 (the full model needs 14-20 GB of host memory to train on CPU), built by
transformers and saved with save_pretrained into the layout huggingface_hub writes, offline. Its
tokenizer is the project's tiny byte-level one (no Qwen tokenizer can be built offline here).

Each command of the doc's code blocks runs as written, in a subprocess with HF_HUB_OFFLINE=1,
except that runs/quickstart becomes a temporary folder and size flags are appended (later flags
win): a few problems, samples and tokens, bf16 parameters for the trainer, so that the whole
walk takes about a minute on 2 cores instead of hours.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import ml_dtypes  # noqa: F401  (numpy reads bf16 safetensors once it is imported)
import numpy as np
import pytest

from conftest import fill_hub_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "quickstart.md")
SHRINK = {
    "explore_jax.evaluate": ["--config.benchmarks.math500.max_problems=2",
                             "--config.benchmarks.math500.n=2",
                             "--config.sampling.max_new_tokens=4", "--config.batch_size=4",
                             "--config.slots=4"],
    "explore_jax.train": ["--config.total_steps=1", "--config.data.prompts_per_step=2",
                          "--config.rollout.n=2", "--config.rl.mini_batch_size=4",
                          "--config.rollout.max_new_tokens=4",
                          "--config.rollout.slots=4", "--config.rl.logit_chunk=64",
                          "--config.reward.workers=1",
                          # 3 x 0.6 GB of float32 weights and AdamW moments: half in bf16
                          "--config.model.param_dtype=bfloat16"],
    "explore_jax.generate": ["--max_new_tokens", "4"],
}
GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643,
                     "max_new_tokens": 2048}


OWN_FILES = {f for _, _, fs in os.walk(os.path.join(REPO, "explore_jax")) for f in fs
             if f.endswith(".py")}


def third_party_info(stderr: str) -> list[str]:
  """The INFO lines of `stderr` (absl's format: "I1207 12:00:00.0 123 file.py:45] ...", or
  Python's "INFO:logger:...") that come from outside explore_jax."""
  out = []
  for line in stderr.splitlines():
    m = re.match(r"I\d{4} [\d:.]+ +\d+ ([^:\s]+):\d+\]", line)
    own = ("INFO:explore_jax", "INFO:root")
    if (m and m[1] not in OWN_FILES) or (line.startswith("INFO:") and not line.startswith(own)):
      out.append(line)
  return out


def _commands(text: str) -> list[list[str]]:
  """The commands of the doc's bash blocks, continuation lines joined, split as a shell would."""
  out = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
    for line in block.replace("\\\n", " ").splitlines():
      if line.strip() and not line.lstrip().startswith("#"):
        out.append(shlex.split(line))
  return out


def qwen05_model(out: str, layers: int = 2) -> int:
  """Qwen2.5-0.5B's config with `layers` layers and random bf16 weights, saved by transformers
  with the tiny tokenizer and the released generation config; returns its parameter count."""
  import torch
  import transformers
  from transformers import initialization

  from explore_jax.data import tokenizer as tokenizer_lib
  config = transformers.Qwen2Config(
      vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
      num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
      tie_word_embeddings=True, max_position_embeddings=32768, bos_token_id=151643,
      eos_token_id=151643, dtype="bfloat16")
  with initialization.no_init_weights():  # filled below, faster than torch's init of 136M
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      x = (np.ones(p.shape, np.float32) if "norm" in name else
           rng.standard_normal(p.shape, dtype=np.float32) * 0.02)
      p.copy_(torch.from_numpy(x))
  model.tie_weights()  # lm_head is embed_tokens again (filled apart above), as released
  model.save_pretrained(out)
  tokenizer_lib.build_tiny_tokenizer(out, num_examples=200)
  with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump(GENERATION_CONFIG, f)
  return model.num_parameters()


def _run(argv, tmp_path, env):
  argv = [sys.executable if a == "python" else a.replace("runs/quickstart",
                                                         str(tmp_path / "runs")) for a in argv]
  module = argv[2] if argv[1] == "-m" else "python"
  argv += SHRINK.get(module, [])
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-4000:])
  return module, proc


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
  with open(DOC) as f:
    commands = _commands(f.read())
  assert [c[2] if c[1] == "-m" else c[0] for c in commands] == [
      "explore_jax.evaluate", "explore_jax.train", "explore_jax.convert", "python",
      "explore_jax.convert", "explore_jax.generate"]
  source = str(tmp_path / "source")
  n_params = qwen05_model(source)
  fill_hub_cache(tmp_path / "hf", "Qwen/Qwen2.5-0.5B", source)
  env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("HF_HUB_CACHE", None)
  outputs = {}
  for argv in commands:
    module, proc = _run(argv, tmp_path, env)
    outputs.setdefault(module, []).append(proc)
    # Third-party INFO (orbax's options, TFDS, JAX's backend probing) stays out: every INFO line
    # comes from explore_jax's own modules.
    assert not third_party_info(proc.stderr), (module, third_party_info(proc.stderr))
    assert "Unable to initialize backend" not in proc.stderr
    assert "CheckpointManager" not in proc.stderr

  runs = tmp_path / "runs"
  with open(runs / "eval" / "results.json") as f:
    entry = json.load(f)["models"]["Qwen2.5-0.5B"]
  assert entry["path"] == "Qwen/Qwen2.5-0.5B" and list(entry["benchmarks"]) == ["math500"]
  assert entry["benchmarks"]["math500"]["num_problems"] == 2
  # The trainer's export and run-to-hf's: the released dtype, its generation config, same weights.
  from safetensors.numpy import load_file
  for hf in (runs / "train" / "hf", runs / "hf"):
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((hf / "generation_config.json").read_text()) == GENERATION_CONFIG
  a = load_file(str(runs / "train" / "hf" / "model.safetensors"))
  b = load_file(str(runs / "hf" / "model.safetensors"))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  assert outputs["explore_jax.convert"][0].stdout.startswith("step 1\n")
  assert outputs["python"][0].stdout.split() == ["torch.bfloat16", str(n_params)]
  check = outputs["explore_jax.convert"][1].stdout.strip().splitlines()[-1]
  assert check.endswith(": match"), check
  assert outputs["explore_jax.generate"][0].stdout.count("=== prompt 0 sample ") == 2
