"""Run a Python script in a child process whose CPU is split into fake devices (XLA's
`--xla_force_host_platform_device_count`): the mesh tests' way to get 8 devices in a process of
their own, whatever this one has."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *, timeout: int, devices: int = 8, expect: str | None = None) -> str:
  """Run `script` with `devices` fake CPU devices; it must exit 0 (and print `expect`, if given).
  -> its stdout."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)
  ok = proc.returncode == 0 and (expect is None or expect in proc.stdout)
  assert ok, proc.stdout + proc.stderr[-3000:]
  return proc.stdout
