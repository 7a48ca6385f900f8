"""Run by tests/test_multihost.py as both processes of a 2-process job: a checkpoint of a state
sharded over both processes in a relative directory, then restores where process 1 alone cannot
read the newest step, where the newest step's bytes were flipped on disk, and onto another
sharding than the one saved."""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from explore_jax.tpu import sharding
from explore_jax.train import state as train_state

parser = argparse.ArgumentParser()
parser.add_argument("--dir")
for key in ("coordinator", "num_processes", "process_id", "cpu_collectives"):
  parser.add_argument(f"--config.distributed.{key}", dest=key)
args = parser.parse_args()
sharding.initialize_distributed(ml_collections.ConfigDict(dict(
    coordinator=args.coordinator, num_processes=int(args.num_processes),
    process_id=int(args.process_id), cpu_collectives=args.cpu_collectives)))
mesh = sharding.make_mesh((-1, 1, 1))
rows = NamedSharding(mesh, P("data"))
rep = NamedSharding(mesh, P())


NOISE = np.random.RandomState(0).randn(8, 512).astype(np.float32)  # incompressible chunks
NOISE -= NOISE.mean(axis=1, keepdims=True)  # each process's rows: mean 0


def state(step):
  w = jax.make_array_from_callback((8, 512), rows, lambda i: (step + NOISE)[i])
  return train_state.TrainState(step=jax.device_put(jnp.array(step, jnp.int32), rep),
                                rng=jax.device_put(jax.random.PRNGKey(0), rep),
                                actor={"w": w}, actor_opt={})


abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state(0))
ckpt = train_state.Checkpointer(args.dir, keep=5)
for step in (1, 2):
  ckpt.save(step, state(step), {"step": step})
ckpt.wait()
real = ckpt._probe


def failing(error):
  def probe(step, abstract):
    if step == 2 and jax.process_index() == 1:
      return train_state.TRANSIENT if isinstance(error, TimeoutError) else train_state.TORN, \
          f"{type(error).__name__}: {error}"
    return real(step, abstract)
  return probe


# Process 1 alone keeps timing out on step 2: both stop with the reason.
ckpt._probe = failing(TimeoutError("read timed out"))
try:
  ckpt.restore_latest(abstract, retries=1, backoff_s=0)
  print("A: restored", flush=True)
except RuntimeError as e:
  print(f"A: stopped: {e}", flush=True)
# Process 1 alone finds step 2 torn: both restore step 1.
ckpt._probe = failing(FileNotFoundError("state/array.zarr missing"))
restored, data = ckpt.restore_latest(abstract, backoff_s=0)
local = np.concatenate([np.asarray(s.data) for s in restored.actor["w"].addressable_shards])
print(f"B: restored step {int(restored.step)} data {data['step']} w {float(local.mean()):.3f}",
      flush=True)
# Step 3, then bytes flipped inside its data files (same size) by process 0: both processes set
# it aside as corrupt and restore step 1.
ckpt._probe = real
ckpt.save(3, state(3), {"step": 3})
ckpt.wait()
if jax.process_index() == 0:
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(args.dir, "3"))
           for name in names if os.path.basename(root) == "d"]
  path = max(files, key=os.path.getsize)  # a data file: the arrays' chunks
  raw = bytearray(open(path, "rb").read())
  middle = len(raw) // 2
  raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
  open(path, "wb").write(bytes(raw))
sharding.barrier("flipped")
restored, data = ckpt.restore_latest(abstract, backoff_s=0)
print(f"C: restored step {int(restored.step)} data {data['step']}", flush=True)
# Onto a replicated state (saved sharded over both processes): the digests still agree.
replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          abstract)
restored, data = ckpt.restore_latest(replicated, backoff_s=0)
w = float(np.asarray(restored.actor["w"]).mean())
print(f"D: restored step {int(restored.step)} w {w:.3f}", flush=True)
ckpt.close()
sys.exit(0)
