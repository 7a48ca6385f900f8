"""Multi-controller JAX on one machine: 2 processes x 2 fake CPU devices, gloo collectives.

The same tiny GRPO run on 2 processes must log the losses of a 1-process run on a mesh of the same
global size (4 devices), a checkpoint written cooperatively by the 2 processes must restore, and
the Hugging Face export (each tensor gathered from both processes, written by process 0) must hold
the 1-process run's weights.
"""

import os
import socket
import subprocess
import tempfile
import time

import jax
import numpy as np
import pytest

from test_train import _command, read_metrics, run_train, train_env  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("actor/loss", "actor/entropy", "actor/grad_norm", "reward/mean",
        "rollout/response_length_mean")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two(commands, env, cwd, timeout=600, check=True):
  """Run commands[0] and commands[1] as processes 0 and 1 of one job: 2 fake CPU devices each,
  gloo collectives, a coordinator on a free local port. Returns their (stdout, stderr), or with
  check=False their (returncode, stdout, stderr); past the timeout both are killed and it raises.
  With check, the first process to fail kills the other and raises with its stderr."""
  port = _free_port()
  env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  # Each process compiles its own programs: a CI run hung once in the resumed run's first step
  # with both processes sharing the persistent compilation cache (one may load a cached
  # executable while the other compiles afresh; their collectives must match). Suspected, not
  # proven: the same runs by hand passed, with and without a shared cache on a loaded machine.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  with tempfile.TemporaryDirectory() as logs:
    procs, files = [], []
    try:
      for pid, cmd in enumerate(commands):
        out, err = (open(os.path.join(logs, f"{pid}.{k}"), "w+") for k in ("out", "err"))
        files.append((out, err))
        procs.append(subprocess.Popen(cmd + [
            f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
            "--config.distributed.cpu_collectives=gloo"], env=env, cwd=cwd, stdout=out,
            stderr=err, text=True))
      deadline = time.monotonic() + timeout
      while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
          raise subprocess.TimeoutExpired(commands[0], timeout)
        if check and any(p.returncode not in (None, 0) for p in procs):
          break  # the other would only wait for it
        time.sleep(0.2)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    results = []
    for out, err in files:
      out.seek(0)
      err.seek(0)
      results.append((out.read(), err.read()))
      out.close()
      err.close()
  if not check:
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, results)]
  # The first to fail says why; a process killed above (returncode < 0) only waited for it.
  for p, (_, err) in sorted(zip(procs, results), key=lambda pr: pr[0].returncode < 0):
    assert p.returncode == 0, err[-4000:]
  return results


def run_two_processes(env, workdir, overrides):
  cmd = _command(workdir, "entropy_reg", overrides)
  return [err for _, err in launch_two([cmd, cmd], env, REPO)]


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(train_env, tmp_path):  # noqa: F811
  base = ["--config.checkpoint_every=2"]
  run_train(train_env, tmp_path / "one", variant="entropy_reg",
            overrides=["--config.total_steps=4"] + base, devices=4)
  one = read_metrics(tmp_path / "one")
  run_two_processes(train_env, tmp_path / "two", ["--config.total_steps=3"] + base)
  two = read_metrics(tmp_path / "two")
  assert [r["step"] for r in two] == [1, 2, 3]
  for a, b in zip(one, two):
    for key in KEYS:
      np.testing.assert_allclose(b[key], a[key], rtol=2e-4, atol=2e-5, err_msg=key)
  # Both processes wrote the step-2 and final checkpoints together; extend the run by one step:
  # the 2 processes restore step 3, and step 4 matches the uninterrupted 1-process run.
  errs = run_two_processes(train_env, tmp_path / "two", ["--config.total_steps=4"] + base)
  assert any("restored checkpoint step 3" in e for e in errs)
  two = read_metrics(tmp_path / "two")
  assert [r["step"] for r in two] == [1, 2, 3, 4]
  for key in KEYS:
    np.testing.assert_allclose(two[3][key], one[3][key], rtol=2e-4, atol=2e-5, err_msg=key)
  # The export of step 4 (written over the 2-process run's step-3 export) holds the weights of the
  # 1-process run's.
  from explore_jax import checkpoint, train
  assert train.exported_step(str(tmp_path / "two" / "hf")) == 4
  cfg_one, params_one = checkpoint.load_hf(tmp_path / "one" / "hf")
  cfg_two, params_two = checkpoint.load_hf(tmp_path / "two" / "hf")
  assert cfg_one == cfg_two
  flat_one, flat_two = (dict(jax.tree_util.tree_leaves_with_path(p))
                        for p in (params_one, params_two))
  assert flat_one.keys() == flat_two.keys()
  for path, x in flat_one.items():
    # atol 1e-4: Adam turns summation-order noise in gradients near eps into ~1e-5 updates; a
    # layout or gather bug shows at ~0.1.
    np.testing.assert_allclose(flat_two[path], x, rtol=1e-4, atol=1e-4, err_msg=str(path))
  assert sorted(os.listdir(tmp_path / "one" / "hf")) == sorted(os.listdir(tmp_path / "two" / "hf"))
