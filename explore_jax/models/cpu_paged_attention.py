"""Paged decode attention on CPU as a native kernel: each row's pages read where they lie.

XLA on CPU has no paged read that computes on the pages in place (the Pallas kernels run on CPU
only through their interpreter), so the pure-JAX gather of `paged_attention` copies the rows'
pages out and runs small products per page: 2-3x the cost per position of a contiguous read
(`benchmarks/paged_read.py`). This kernel (`cpu_paged_attention.cc`, about 160 lines of C++)
walks each row's table instead, an online softmax one page at a time, and reads exactly the
positions the row holds. It is called through `jax.ffi` (an XLA custom call), on each device's
pages (inside the engine's `shard_map` on a mesh).

It is built on first use with the system's C++ compiler (`CXX`, else `c++`) against the XLA FFI
headers that ship with jaxlib, for this machine's CPU, with fast math when compiling and not when
linking (`_flags`), into a cache folder (`EXPLORE_JAX_CACHE`, else ~/.cache/explore_jax) keyed
by the source, the compiler, jaxlib's version and the CPU's flags; a build is written to a
temporary name and renamed, so processes that build it at once do not collide. Where no
compiler builds it, `available()` is False and the paged engine's `auto` read stays the gather.
The gather remains the reference the tests compare this kernel with.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_paged_attention.cc")
_TARGETS = {jnp.dtype(jnp.float32): ("explore_jax_paged_attention_f32", "PagedAttentionF32"),
            jnp.dtype(jnp.bfloat16): ("explore_jax_paged_attention_bf16", "PagedAttentionBF16")}
DTYPES = tuple(_TARGETS)


def _cache_dir() -> str:
  return os.environ.get("EXPLORE_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "explore_jax")


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _flags(native: bool) -> list[str]:
  """The compile step's flags; native: for this machine's CPU (its widest vectors), as XLA
  compiles for it. Fast math (vectorized exp and sums) is a compile flag only: linked with it, a
  library sets the process's flush-to-zero mode when loaded (GCC's crtfastmath), and every float
  in the process loses its subnormals."""
  return ["-O3", *(["-march=native"] if native else []), "-ffast-math", "-fopenmp-simd",
          "-fPIC", "-std=c++17", "-w", "-isystem", jax.ffi.include_dir()]


_LINK = ["-shared"]  # no fast math here (see _flags)


def _cpu_id() -> bytes:
  """What the library's machine code depends on (it is built for this CPU)."""
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith(b"flags")), b"")
  except OSError:
    return platform.processor().encode()


def build() -> str:
  """The kernel's shared library, built if not cached; raises RuntimeError (with the
  compiler's message) where it cannot be built."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("cpu paged attention: no C++ compiler (set CXX, or install g++)")
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(source + cxx.encode() + jaxlib.__version__.encode() + _cpu_id()
                       + " ".join(_flags(True) + _LINK).encode()).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f"cpu_paged_attention_{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  obj = tmp[:-3] + ".o"
  run = lambda args: subprocess.run(args, capture_output=True, text=True, timeout=300)
  try:
    for native in (True, False):  # a compiler that does not know this CPU: its baseline
      done = run([cxx, *_flags(native), "-c", SOURCE, "-o", obj])
      if not done.returncode:
        done = run([cxx, *_LINK, obj, "-o", tmp])
      if not done.returncode:
        break
    else:
      raise RuntimeError(f"cpu paged attention: {cxx} failed to build {SOURCE}:\n"
                         f"{done.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: a process that built it at the same time wrote the same
  finally:
    for leftover in (tmp, obj):
      if os.path.exists(leftover):
        os.remove(leftover)
  return path


@functools.cache
def _register() -> bool:
  lib = ctypes.cdll.LoadLibrary(build())
  for name, symbol in _TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return True


@functools.cache
def available() -> bool:
  """Whether the kernel builds and loads on this machine (built on the first call)."""
  try:
    return _register()
  except (RuntimeError, OSError, subprocess.TimeoutExpired):
    return False


def attend(q: jax.Array, kp: jax.Array, vp: jax.Array, table: jax.Array, reads: jax.Array
           ) -> jax.Array:
  """q [S, N, H] over each row's first reads[s] positions (0: idle, output 0) of pages kp, vp
  [K, NP, PS, H] through table [S, W]; -> [S, N, H]. float32 or bfloat16 (q, kp and vp the
  same), computed in float32."""
  dtype = jnp.dtype(q.dtype)
  if dtype not in _TARGETS or kp.dtype != dtype or vp.dtype != dtype:
    raise ValueError(f"cpu paged attention: q, k and v pages must share one of {DTYPES}, got "
                     f"{q.dtype}, {kp.dtype}, {vp.dtype}")
  _register()
  return jax.ffi.ffi_call(_TARGETS[dtype][0], jax.ShapeDtypeStruct(q.shape, dtype))(
      q, kp, vp, table.astype(jnp.int32), reads.astype(jnp.int32))
