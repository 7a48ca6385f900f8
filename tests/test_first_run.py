"""What a researcher's first run with a real model meets: the small-model configs, a mesh error
that says which flag to change, benchmarks picked from the command line, dtypes and generation
configs kept through conversions, chat prompts, quiet logs and the parity check."""

import io
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import make_tiny_hf
from explore_jax.config import cli as cli_lib
from explore_jax.config import defaults
from explore_jax.evaluation import evaluate
from explore_jax.models import checkpoint, qwen2
from explore_jax.rollout import cli as generate_cli
from explore_jax.tpu import sharding
from explore_jax.train import export, setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A tiny random Qwen2 saved by transformers in bf16, the project's tiny tokenizer (it has a
  chat template) and a generation config of the model's own."""
  import torch

  from explore_jax.data import tokenizer as tokenizer_lib
  out = tmp_path_factory.mktemp("tiny_hf")
  make_tiny_hf(vocab_size=384, eos_token_id=0).hf.to(torch.bfloat16).save_pretrained(out)
  tokenizer_lib.build_tiny_tokenizer(str(out), num_examples=200)
  (out / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": 0, "eos_token_id": [0, 2], "temperature": 0.7, "top_p": 0.8}))
  return out


def test_small_configs_name_hub_models_and_fit_their_positions():
  small = _config("configs/grpo_qwen25_small.py")
  want = {"0.5b": ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b", 8192),
          "1.5b": ("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b", 8192),
          "math-1.5b": ("Qwen/Qwen2.5-Math-1.5B", "qwen2.5-math-1.5b", 3072)}
  for arg, (path, preset, response) in want.items():
    c = small.get_config(f"model={arg}")
    assert (c.model.path, c.rollout.max_new_tokens, c.mesh.shape) == (path, response, (1, -1, 1))
    setup.check_context(c, qwen2.PRESETS[preset])  # 1024 + response fits the model's positions
  math = qwen2.PRESETS["qwen2.5-math-1.5b"]  # its released config.json
  assert (math.num_hidden_layers, math.hidden_size, math.intermediate_size,
          math.num_attention_heads, math.num_key_value_heads, math.vocab_size, math.rope_theta,
          math.max_position_embeddings, math.tie_word_embeddings) == (
              28, 1536, 8960, 12, 2, 151936, 1e4, 4096, True)
  c = small.get_config("model=math-1.5b")
  c.rollout.max_new_tokens = 8192  # the paper's 1K + 8K
  with pytest.raises(cli_lib.BadValue, match=r"1024 \+ 8192 = 9216 positions; the model "
                     r"\(Qwen/Qwen2.5-Math-1.5B\) is trained to 4096"):
    setup.check_context(c, math)
  with pytest.raises(ValueError, match="model='7b'"):
    small.get_config("model=7b")


def test_a_mesh_that_does_not_fit_names_the_flag_and_the_devices():
  one = jax.devices()[:1]
  with pytest.raises(sharding.MeshError) as e:
    sharding.make_mesh((1, -1, 4), one, what="--config.mesh.shape")
  assert str(e.value).startswith("--config.mesh.shape=(1, -1, 4) does not divide the 1 devices "
                                 "here (cpu); set --config.mesh.shape to a (data, fsdp, tensor) "
                                 "shape for 1 devices")
  assert sharding.make_mesh((1, -1, 1), one).shape == {"data": 1, "fsdp": 1, "tensor": 1}


def test_train_cli_mesh_error_is_one_line(tmp_path):
  # The 7B config's 4-way tensor parallelism on a 1-device host: one line, no traceback, no
  # workdir left behind.
  proc = subprocess.run(
      [sys.executable, "-m", "explore_jax.train", "--config", "configs/grpo_qwen25_7b.py",
       "--workdir", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: --config.mesh.shape=(1, -1, 4) does not divide the 1 devices here"), proc.stderr
  assert not (tmp_path / "run").exists()


def test_only_picks_benchmarks_from_the_command_line():
  c = _config("configs/eval_paper.py").get_config()
  assert evaluate.selected_benchmarks(c) == ["aime24", "aime25", "amc23", "gsm8k", "math500"]
  c.only = "math500, aime24"
  assert evaluate.selected_benchmarks(c) == ["math500", "aime24"]
  c.only = "math500,aime26"
  with pytest.raises(cli_lib.BadValue, match=r"config.only='math500,aime26': \['aime26'\] not "
                     "in config.benchmarks"):
    evaluate.selected_benchmarks(c)


def test_conversions_keep_the_dtype_and_the_generation_config(tiny_model_dir, tmp_path):
  assert checkpoint.saved_dtype(str(tiny_model_dir)) == "bfloat16"
  export.hf_to_orbax(str(tiny_model_dir), str(tmp_path / "orbax"))
  assert checkpoint.load_model_config(str(tmp_path / "orbax")).param_dtype == "bfloat16"
  export.orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "hf"))
  hf = tmp_path / "hf"
  assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert (hf / "generation_config.json").read_bytes() == (
      tiny_model_dir / "generation_config.json").read_bytes()
  # The weights went through bf16 unchanged.
  _, a = checkpoint.load_hf(str(tiny_model_dir), "bfloat16")
  _, b = checkpoint.load_hf(str(hf), "bfloat16")
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), a, b)))
  # An explicit dtype on export: float32 master weights written as bf16, cast on the host.
  config, params = checkpoint.load_hf(str(tiny_model_dir), "float32")
  checkpoint.save_hf(config, params, tmp_path / "cast", dtype="bfloat16",
                     source_dir=str(tiny_model_dir))
  assert checkpoint.saved_dtype(str(tmp_path / "cast")) == "bfloat16"
  _, c = checkpoint.load_hf(str(tmp_path / "cast"), "bfloat16")
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), a, c)))
  assert json.loads((tmp_path / "cast" / "generation_config.json").read_text())[
      "eos_token_id"] == [0, 2]


def test_chat_prompts_use_the_tokenizer_template(tiny_model_dir):
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
  assert generate_cli.chat_prompts(tok, ["1+1="]) == [
      "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"]
  tok.chat_template = None
  with pytest.raises(cli_lib.BadValue, match="--chat: the tokenizer .* has no chat template"):
    generate_cli.chat_prompts(tok, ["1+1="])


QUIET_SCRIPT = """
import logging, sys
from absl import app, flags
from explore_jax.config import cli
verbose = flags.DEFINE_bool("verbose", False, "")
def main(argv):
  cli.quiet_logs(verbose.value)
  logging.getLogger("absl").info("orbax-style bookkeeping")
  logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
  logging.getLogger("absl").warning("a real warning")
  logging.info("the run's own line")
app.run(main)
"""


def test_quiet_logs_drop_third_party_info_and_verbose_brings_it_back():
  # Under absl.app, as the trainer, the evaluator and aot run: its handler is the root's.
  for verbose, third_party in ((False, []), (True, ["orbax-style bookkeeping",
                                                    "Unable to initialize backend 'tpu'"])):
    proc = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, f"--verbose={verbose}"],
                          capture_output=True, text=True, timeout=120, check=True)
    got = [line.split("] ", 1)[-1] for line in proc.stderr.strip().splitlines()]
    assert got == third_party + ["a real warning", "the run's own line"], proc.stderr


def test_log_lines_are_written_whole_above_the_progress_bar(monkeypatch, caplog):
  err = io.StringIO()
  monkeypatch.setattr(sys, "stderr", err)
  root = logging.getLogger()
  handler = logging.StreamHandler(err)
  monkeypatch.setattr(root, "handlers", [handler])
  # Through setLevel, which clears the loggers' cached levels (an earlier test in this process
  # may have asked for INFO while the root was at WARNING); put back after the test.
  caplog.set_level(logging.INFO)
  bar = cli_lib.progress_bar(total=3, desc="train", file=err, mininterval=0)
  for step in range(3):
    bar.update(1)
    logging.info("line %d", step)
  bar.close()
  assert root.handlers == [handler]  # put back
  text = err.getvalue()
  for step in range(3):
    before = text[:text.index(f"line {step}")]
    assert before.endswith(("\r", "\n")), repr(before[-40:])  # never glued to the bar's text


def test_convert_check_passes_a_good_checkpoint_and_fails_a_misread_one(tiny_model_dir, capsys):
  ok = export.check(str(tiny_model_dir), [], None, "float32", 1e-2, 0.99)
  out = capsys.readouterr().out
  assert ok and out.strip().splitlines()[-1].endswith("match")
  assert float(out.split("max |logit diff| ")[-1].split()[0]) < 1e-3
  # A reader that gets one config field wrong (rope_theta): the check must catch it.
  read = checkpoint.Qwen2Config.from_hf_dict

  def misread(d, **kw):
    return read(dict(d, rope_theta=1e6), **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpoint.Qwen2Config, "from_hf_dict", staticmethod(misread))
    assert not export.check(str(tiny_model_dir), ["1+1=2, 2+2=4, 3+3=6, 4+4=8"], None,
                            "float32", 1e-2, 0.99)
  assert capsys.readouterr().out.strip().splitlines()[-1].endswith("MISMATCH")


@pytest.mark.slow
def test_training_a_bf16_hub_model_exports_bf16_with_its_generation_config(offline_hub,
                                                                          tiny_model_dir,
                                                                          tmp_path):
  # float32 master weights (model.param_dtype) trained from a bf16 checkpoint named by hub id:
  # the trainer's export and run-to-hf write bf16 again unless told otherwise.
  from conftest import fill_hub_cache
  from safetensors.numpy import load_file
  fill_hub_cache(offline_hub, "org/tiny", tiny_model_dir)
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "explore_jax.train", "--config", "configs/tiny_cpu.py:size=test",
       "--workdir", str(workdir), "--config.model.path=org/tiny", "--config.total_steps=1",
       "--config.model.param_dtype=float32"], capture_output=True, text=True, cwd=REPO, env=env,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from test_quickstart import third_party_info
  assert not third_party_info(proc.stderr), third_party_info(proc.stderr)
  assert "restored" not in proc.stderr and "no complete checkpoint" in proc.stderr  # own lines
  assert json.loads((workdir / "model" / "config.json").read_text())["torch_dtype"] == "float32"
  assert json.loads((workdir / "model" / export.SOURCE_RECORD).read_text()) == {
      "model": "org/tiny", "torch_dtype": "bfloat16"}
  source_generation = (tiny_model_dir / "generation_config.json").read_bytes()
  for sub in ("hf", "again"):
    if sub == "again":
      assert export.run_to_hf(str(workdir), str(tmp_path / "again")) == 1
    out = workdir / sub if sub == "hf" else tmp_path / sub
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "generation_config.json").read_bytes() == source_generation
  a = load_file(str(workdir / "hf" / "model.safetensors"))
  b = load_file(str(tmp_path / "again" / "model.safetensors"))
  assert all(a[k].dtype.name == "bfloat16" and np.array_equal(a[k], b[k]) for k in a)
  export.run_to_hf(str(workdir), str(tmp_path / "f32"), dtype="float32")
  assert checkpoint.saved_dtype(str(tmp_path / "f32")) == "float32"


@pytest.mark.slow
def test_cpu_dry_run_adds_the_checkpoint_copy_when_a_save_precedes_a_step():
  from explore_jax.tpu import aot
  from explore_jax.train import state as train_state
  c = _config("configs/tiny_cpu.py").get_config("size=test")
  c.rollout.engine = "static"  # the scoring pass and the update only: two compiles
  model_cfg = qwen2.Qwen2Config(vocab_size=384, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2)
  mesh = sharding.make_mesh((1, -1, 1))
  cfg = setup.step_config(c, model_cfg, tuple(mesh.shape.values()))
  optim = setup.optimizers(c)
  shapes, _ = train_state.abstract_state(model_cfg, optim.actor_tx, optim.critic_tx, False)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  c.total_steps, c.checkpoint_every = 3, 1  # a save after step 1 is written while step 2 runs
  got = aot.host_peak(c, model_cfg, cfg, mesh)
  assert set(got["programs"]) == {"score", "update"}
  assert got["checkpoint_copy_bytes"] == state_bytes
  assert got["peak_bytes"] == (got["process_bytes"] + max(got["programs"].values())
                               + state_bytes)
  assert got["process_bytes"] > 100 * 2**20  # Python, JAX, transformers: not nothing
  assert got["programs"]["update"] > state_bytes  # the state is the update's argument
  c.total_steps = 1  # the only save comes after the last step
  assert aot.checkpoint_copy_bytes(c, state_bytes) == 0
  c.total_steps, c.checkpoint_every = 3, 5
  assert aot.checkpoint_copy_bytes(c, state_bytes) == 0
  c.checkpoint_every_minutes = 10.0
  assert aot.checkpoint_copy_bytes(c, state_bytes) == state_bytes
