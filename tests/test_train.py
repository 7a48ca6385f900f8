"""The trainer end to end, as a user runs it: `python -m explore_jax.train --config ... --workdir`.

Every run uses `configs/tiny_cpu.py:size=test` (a 2-layer Qwen2 pre-trained on one-digit additions,
cached for the session) in a subprocess, with a persistent compilation cache shared by the runs.
"""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny_cpu.py")

REQUIRED_METRICS = (
    "reward/mean", "reward/accuracy", "rollout/response_length_mean",
    "rollout/response_length_max", "rollout/truncated_frac", "rollout/entropy", "actor/entropy",
    "actor/psi_mean", "actor/psi_over_abs_adv", "actor/clip_frac", "actor/approx_kl",
    "actor/grad_norm", "optim/actor_lr", "rollout/logprob_gap", "perf/rollout_s", "perf/reward_s",
    "perf/update_s", "perf/rollout_tokens_per_s", "perf/update_tokens_per_s",
    "rollout/slot_utilization", "rollout/retry_frac", "rollout/entropy_first_token",
    "actor/psi_clip_binds_pos", "actor/psi_clip_binds_neg")


@pytest.fixture(scope="session")
def train_env(tmp_path_factory):
  root = tmp_path_factory.getbasetemp().parent  # shared by xdist workers of this session
  env = dict(os.environ)
  env.update(EXPLORE_JAX_CACHE=str(root / "explore_jax_cache"),
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


# The uninterrupted run that other ways of running the same job are compared against.
REFERENCE = ["--config.total_steps=4", "--config.checkpoint_every=2"]


@pytest.fixture(scope="session")
def reference_run(train_env, tmp_path_factory):
  """The workdir of one uninterrupted `entropy_reg` run of REFERENCE on one device (continuous
  engine, HF export), shared by the tests that run the same job another way (8 fake devices,
  2 processes, killed and resumed): the first xdist worker to ask runs it, another waits for it
  on a file lock instead of running it again."""
  root = tmp_path_factory.getbasetemp().parent
  workdir = root / "reference_run"
  with open(root / "reference_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "done").exists():
      shutil.rmtree(workdir, ignore_errors=True)
      run_train(train_env, workdir, variant="entropy_reg", overrides=REFERENCE)
      (workdir / "done").touch()
  return workdir


def _command(workdir, variant="entropy_adv", overrides=()):
  return [sys.executable, "-m", "explore_jax.train",
          f"--config={CONFIG}:size=test,variant={variant}", f"--workdir={workdir}",
          *overrides]


def run_train(env, workdir, variant="entropy_adv", overrides=(), devices=1, check=True, cwd=REPO):
  env = dict(env)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  proc = subprocess.run(_command(workdir, variant, overrides), env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode:
    raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def comparable(rows):
  """Every metric but timings, which differ from run to run."""
  return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_metrics_config_and_export(train_env, tmp_path):
  workdir = tmp_path / "run"
  run_train(train_env, workdir, overrides=["--config.total_steps=2"])
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  for row in rows:
    missing = [k for k in REQUIRED_METRICS if k not in row]
    assert not missing, missing
    assert all(np.isfinite(v) for v in row.values())
    assert -1.0 <= row["reward/mean"] <= 1.0
    assert 0 < row["rollout/response_length_mean"] <= 24
  # The first update of a rollout has ratio 1: the trainer's log-probs equal the sampler's.
  assert rows[0]["rollout/logprob_gap"] < 1e-4
  config = json.loads((workdir / "config.json").read_text())
  assert config["rl"]["entropy_advantage"] is True and config["rl"]["alpha"] == 0.4
  assert (workdir / "hf" / "config.json").exists()  # the trained actor in HF format
  assert any((workdir / "tb").iterdir())
  # The same command again: nothing left to train, and the export is not rewritten.
  weights = workdir / "hf" / "model.safetensors"
  written = weights.stat().st_mtime_ns
  proc = run_train(train_env, workdir, overrides=["--config.total_steps=2"])
  assert weights.stat().st_mtime_ns == written
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
  # Each start was recorded with its commit and versions; the same code and venv: no warning.
  starts = json.loads((workdir / "environment.json").read_text())
  assert len(starts) == 2 and starts[0]["packages"] == starts[-1]["packages"]
  import jax
  assert starts[-1]["packages"]["jax"] == jax.__version__
  assert "other code or versions" not in proc.stderr
  # Any checkpoint exports from the workdir alone: the newest one holds the exported weights.
  convert = [sys.executable, "-m", "explore_jax.convert", "run-to-hf", f"--workdir={workdir}"]
  proc = subprocess.run(convert + [f"--out={tmp_path / 'from_ckpt'}"], env=train_env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "step 2" in proc.stdout, proc.stderr[-3000:]
  from safetensors.numpy import load_file
  exported = load_file(str(workdir / "hf" / "model.safetensors"))
  converted = load_file(str(tmp_path / "from_ckpt" / "model.safetensors"))
  assert exported.keys() == converted.keys()
  for name, x in exported.items():
    assert x.dtype == converted[name].dtype and x.tobytes() == converted[name].tobytes(), name
  for fn in ("config.json", "tokenizer.json"):
    assert (tmp_path / "from_ckpt" / fn).read_text() == (workdir / "hf" / fn).read_text(), fn
  proc = subprocess.run(convert + ["--step=7", f"--out={tmp_path / 'none'}"], env=train_env,
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "no complete checkpoint of step 7; saved: [2]" in proc.stderr
  # An export cut short (its step record is written last, so it is missing) is redone.
  (workdir / "hf" / "explore_jax_export.json").unlink()
  run_train(train_env, workdir, overrides=["--config.total_steps=2"])
  assert weights.stat().st_mtime_ns != written
  assert json.loads((workdir / "hf" / "explore_jax_export.json").read_text()) == {"step": 2}


def test_metrics_and_export_in_a_bucket(fake_bucket, tmp_path):
  """A gs:// workdir (served from memory): the metrics cut back to the step a resumed run
  restarts from (more in test_metrics_io), and the HF export with its step record, byte for byte
  as on a local disk."""
  import jax
  from etils import epath

  from explore_jax.models import qwen2
  from explore_jax.train import export
  from explore_jax.train import metrics as metrics_io

  workdir = "gs://bucket/run"
  log = metrics_io.MetricsLog(workdir, resume_step=0)
  for step in (1, 2, 3):
    log.write(step, {"reward/mean": step / 10})
  log.close()
  log = metrics_io.MetricsLog(workdir, resume_step=2)  # restarted from the step-2 checkpoint
  log.write(3, {"reward/mean": 0.5})
  log.close()
  assert metrics_io.read_metrics(workdir) == [
      {"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.2},
      {"step": 3, "reward/mean": 0.5}]

  cfg = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
  params = qwen2.init_params(cfg, jax.random.key(0))
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text('{"version": "1.0"}')
  assert export.exported_step(workdir + "/hf") is None
  for out in (workdir + "/hf", str(tmp_path / "hf")):
    export.export_hf(cfg, params, out, str(tok), step=3)
    assert export.exported_step(out) == 3
  names = sorted(os.listdir(tmp_path / "hf"))
  assert export.EXPORT_RECORD in names
  assert sorted(p.name for p in epath.Path(workdir, "hf").iterdir()) == names
  for name in names:
    assert epath.Path(workdir, "hf", name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


@pytest.mark.slow
def test_countdown_testbed_trains_the_placebo_arm(train_env, tmp_path):
  """configs/countdown.py end to end: a base model pre-trained on countdown traces (half of them
  retrying), graded by evaluating the boxed expression, with the testbed's metrics."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "explore_jax.train",
         f"--config={os.path.join(REPO, 'configs', 'countdown.py')}:size=test,variant=placebo",
         f"--workdir={workdir}", "--config.total_steps=2", "--config.export_hf=False"]
  proc = subprocess.run(cmd, env=train_env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert -1.0 <= r["reward/mean"] <= 1.0
    # 16 rows of {-1, +1} rewards: the mean is a multiple of 1/8.
    assert abs(r["reward/mean"] * 8 - round(r["reward/mean"] * 8)) < 1e-5
    assert 0.0 <= r["rollout/retry_frac"] <= 1.0 and r["rollout/entropy_first_token"] > 0.0
    # The placebo's psi is alpha * H on every token, unclipped (the paper's psi would be at
    # most |A| / kappa, and 0 on rows without signal): its mean is alpha times the entropy.
    np.testing.assert_allclose(r["actor/psi_mean"], 0.4 * r["actor/entropy"], rtol=1e-4)
  config = json.loads((workdir / "config.json").read_text())
  assert config["rl"]["entropy_clip"] is False and config["data"]["name"] == "countdown"


def test_mistyped_override_fails(train_env, tmp_path):
  proc = run_train(train_env, tmp_path / "run", overrides=["--config.rl.alhpa=0.2"], check=False)
  assert proc.returncode != 0
  assert "alhpa" in proc.stderr


@pytest.mark.slow
def test_reward_rises(train_env, tmp_path):
  workdir = tmp_path / "run"
  run_train(train_env, workdir, variant="baseline", overrides=[
      "--config.total_steps=60", "--config.data.prompts_per_step=16", "--config.rollout.n=8",
      "--config.rl.mini_batch_size=32", "--config.rl.micro_batch_size=32",
      "--config.checkpoint_every=60"])
  reward = np.array([r["reward/mean"] for r in read_metrics(workdir)])
  first, last = reward[:20].mean(), reward[-20:].mean()
  # Over 4 seeds this rise measured 0.13-0.23 (mean 0.175, sd 0.04): 0.02 is about 4 sd below,
  # so a run on another CPU, whose rounding sends sampling down another path, still passes.
  assert last > first + 0.02, (first, last, reward.round(2).tolist())


@pytest.mark.slow
def test_one_device_equals_eight_fake_devices(train_env, reference_run, tmp_path):
  """Same losses on one CPU device with the continuous rollout engine as on a 2 x 2 x 2 (data,
  fsdp, tensor) mesh of fake devices with the static engine and length buckets (rows sorted,
  micro-batches cut: the same update): one run for the three changes, since any of them
  differing would show."""
  run_train(train_env, tmp_path / "buckets", variant="entropy_reg", devices=8, overrides=REFERENCE
            + ["--config.export_hf=False", "--config.mesh.shape=(2,2,2)",
               "--config.rl.length_buckets=3", "--config.rollout.engine=static"])
  one = read_metrics(reference_run)
  assert all(0 < r["rollout/slot_utilization"] <= 1 for r in one)
  buckets = read_metrics(tmp_path / "buckets")
  assert len(one) == len(buckets) == 4
  for a, b in zip(one, buckets):
    for key in ("actor/loss", "actor/entropy", "actor/grad_norm", "reward/mean",
                "rollout/response_length_mean", "actor/psi_mean"):
      np.testing.assert_allclose(b[key], a[key], rtol=2e-4, atol=2e-5, err_msg=key)
  assert one[-1]["actor/grad_norm"] > 0
  assert max(r["perf/update_length_frac"] for r in buckets) < 1.0  # padding was skipped


def _wait_for_step(workdir, step, proc, timeout=600):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"train exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if os.path.exists(path) and any(json.loads(l)["step"] >= step
                                    for l in open(path).read().splitlines() if l):
      return
    time.sleep(0.05)
  raise AssertionError(f"step {step} never logged")


@pytest.mark.slow
def test_resume_is_exact_after_sigterm_and_sigkill(train_env, reference_run, tmp_path):
  overrides = REFERENCE
  expected = comparable(read_metrics(reference_run))
  assert len(expected) == 4

  # SIGTERM (TPU preemption): saves at the next step boundary and exits 0; the rerun resumes.
  workdir = tmp_path / "sigterm"
  proc = subprocess.Popen(_command(workdir, "entropy_reg", overrides), env=train_env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, 1, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  stopped_at = len(read_metrics(workdir))
  assert stopped_at < 4
  run_train(train_env, workdir, variant="entropy_reg", overrides=overrides)
  assert comparable(read_metrics(workdir)) == expected

  # SIGKILL after step 3 (checkpoint at 2): the rerun redoes steps 3-4 from the step-2 checkpoint.
  workdir = tmp_path / "sigkill"
  proc = subprocess.Popen(_command(workdir, "entropy_reg", overrides), env=train_env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, 3, proc)
  # Orbax writes checkpoints asynchronously; kill only once step 2's is committed (renamed from
  # its temporary name), so that the rerun has exactly one complete checkpoint to find.
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "2").is_dir() and time.time() < deadline:
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  proc = run_train(train_env, workdir, variant="entropy_reg", overrides=overrides)
  assert "restored checkpoint step" in proc.stderr
  assert comparable(read_metrics(workdir)) == expected


def _flip_bytes(step_dir, count=400):
  """`count` bytes flipped in the middle of the step's largest data file, its size unchanged (a
  disk or a bucket that returns other bytes than were written)."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  target = max(files, key=lambda f: f.stat().st_size)
  raw = bytearray(target.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + count] = bytes(b ^ 0xFF for b in raw[middle:middle + count])
  target.write_bytes(bytes(raw))


@pytest.mark.slow
def test_relative_workdir_torn_and_corrupt_checkpoints(train_env, tmp_path):
  """A run in a relative workdir resumes from it (it once set its complete checkpoint aside as
  torn and started afresh); a torn step and a step whose bytes were flipped on disk are set
  aside and the step before them restored; `run-to-hf` exports from the relative workdir."""
  overrides = ["--config.checkpoint_every=1", "--config.export_hf=False",
               "--config.keep_checkpoints=3"]
  run = lambda steps: run_train(train_env, "rel", overrides=[f"--config.total_steps={steps}"]
                                + overrides, cwd=tmp_path)
  proc = run(2)
  assert "no complete checkpoint" in proc.stderr  # a fresh workdir says it starts fresh
  ckpts = tmp_path / "rel" / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["1", "2"]
  proc = run(3)
  assert "restored checkpoint step 2" in proc.stderr and "moved it to" not in proc.stderr
  # Step 3's bytes flipped (same size); step 2 torn, as a crash mid-write leaves it.
  _flip_bytes(ckpts / "3")
  for f in (ckpts / "2" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  proc = run(4)
  assert "checkpoint step 3" in proc.stderr and "does not hold what was saved" in proc.stderr
  assert "from its digest at save: actor" in proc.stderr  # names the array (actor or actor_opt)
  assert "checkpoint step 2" in proc.stderr and "is incomplete" in proc.stderr
  assert "restored checkpoint step 1" in proc.stderr
  assert [r["step"] for r in read_metrics(tmp_path / "rel")] == [1, 2, 3, 4]
  aside = sorted(p.name.split("_")[0] for p in ckpts.iterdir() if not p.name.isdigit())
  assert aside == ["corrupt", "torn"]
  convert = [sys.executable, "-m", "explore_jax.convert", "run-to-hf", "--workdir=rel",
             "--out=exported"]
  proc = subprocess.run(convert, env=train_env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "step 4" in proc.stdout, proc.stderr[-3000:]
  assert (tmp_path / "exported" / "model.safetensors").exists()


def test_dry_run_prints_the_memory_plan(train_env, tmp_path):
  """--config.dry_run builds the state from shapes on an 8-device (1, 4, 2) mesh, allocates
  nothing, and its measured per-device bytes equal explore_jax.tpu.memory's analytic plan."""
  import importlib.util
  import re
  from explore_jax.demo import pretrain
  from explore_jax.models import qwen2
  from explore_jax.tpu import memory

  env = dict(train_env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  overrides = ["--config.dry_run=True", "--config.mesh.shape=(1,4,2)"]
  proc = run_train(env, tmp_path / "run", variant="ppo", overrides=overrides)
  measured = {m[1]: int(m[2].replace(",", "")) for m in
              re.finditer(r"^\s+(\w+)\s+([\d,]+) bytes", proc.stdout, re.M)}
  assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing saved

  spec = importlib.util.spec_from_file_location("tiny_cpu", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("size=test,variant=ppo")
  os.environ["EXPLORE_JAX_CACHE"] = train_env["EXPLORE_JAX_CACHE"]
  model_cfg = qwen2.Qwen2Config.from_hf_json(pretrain.base_model(config))
  plan = memory.plan_for_config(config, model_cfg, (1, 4, 2))["components"]
  assert measured["actor"] == plan["actor_params"]["bytes"]
  assert measured["critic"] == plan["critic_params"]["bytes"]
  # AdamW's mu and nu, plus its step counters (a few int32 scalars).
  assert 0 <= measured["actor_opt"] - plan["actor_adamw_mu_nu"]["bytes"] <= 64
  assert 0 <= measured["critic_opt"] - plan["critic_adamw_mu_nu"]["bytes"] <= 64
  assert measured["total"] == sum(measured[k] for k in ("actor", "actor_opt", "critic",
                                                       "critic_opt"))


def test_resume_refuses_a_changed_config(train_env, tmp_path):
  """Rerunning a workdir with another setting must not continue the old run under the new name;
  how long it runs may change."""
  workdir = tmp_path / "run"
  overrides = ["--config.total_steps=1", "--config.export_hf=False"]
  # A run that fails before its first checkpoint does not bind the workdir to its config.
  proc = run_train(train_env, workdir, overrides=overrides + ["--config.model.path=/no/such/dir"],
                   check=False)
  assert proc.returncode != 0 and "/no/such/dir" in proc.stderr
  # (A model.path that holds no model is named in its error: tests/test_checkpoint.py.)
  run_train(train_env, workdir, overrides=overrides)
  proc = run_train(train_env, workdir, overrides=overrides + ["--config.optim.lr=0.5"],
                   check=False)
  assert proc.returncode != 0
  assert "different config (optim.lr: 0.001 -> 0.5)" in proc.stderr
  assert [r["step"] for r in read_metrics(workdir)] == [1]  # nothing was lost or redone
  # A config.json written before a key existed: the key counts as its default, not a change.
  recorded = json.loads((workdir / "config.json").read_text())
  del recorded["pretrain"]["direct_answer_frac"]
  (workdir / "config.json").write_text(json.dumps(recorded))
  # How long a run lasts, and its memory layout, may change.
  proc = run_train(train_env, workdir, overrides=[
      "--config.total_steps=2", "--config.export_hf=False", "--config.rl.micro_batch_size=2"])
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
