"""Run by tests/test_multihost.py as both processes of a 2-process job: a checkpoint of a state
sharded over both processes in a relative directory, then restores where process 1 alone cannot
read the newest step, where the newest step's digest record does not match what it holds, onto
another sharding than the one saved, and where process 1's read raises inside orbax."""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.checkpointers import checkpointer as orbax_checkpointer

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
# Step 3, then its digest record altered by process 0 (the arrays read back fine, but not as
# recorded at save): both processes set it aside as corrupt and restore step 1.
ckpt._probe = real
ckpt.save(3, state(3), {"step": 3})
ckpt.wait()
if jax.process_index() == 0:
  path = os.path.join(args.dir, "3", train_state.DIGEST_ITEM, "metadata")
  record = json.load(open(path))
  saved = record["arrays"]["actor/w"]  # a hex string
  record["arrays"]["actor/w"] = saved[:-1] + ("1" if saved[-1] == "0" else "0")
  json.dump(record, open(path, "w"))
sharding.barrier("altered")
restored, data = ckpt.restore_latest(abstract, backoff_s=0)
print(f"C: restored step {int(restored.step)} data {data['step']}", flush=True)
# Onto a replicated state (saved sharded over both processes): the digests still agree.
replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          abstract)
restored, data = ckpt.restore_latest(replicated, backoff_s=0)
w = float(np.asarray(restored.actor["w"]).mean())
print(f"D: restored step {int(restored.step)} w {w:.3f}", flush=True)
# Step 4, whose read raises inside orbax on process 1 alone (as a chunk that does not decode
# there), after which process 0 waits in orbax's barrier: both set it aside, restore step 1.
ckpt.save(4, state(4), {"step": 4})
ckpt.wait()
real_restore = orbax_checkpointer.Checkpointer._restore


def restore_failing_on_1(self, directory, args):
  if jax.process_index() == 1 and str(directory).rstrip("/").endswith("/4"):
    raise ValueError("chunk (6:8, 0:512) does not decode")
  return real_restore(self, directory, args)


orbax_checkpointer.Checkpointer._restore = restore_failing_on_1
restored, data = ckpt.restore_latest(abstract, backoff_s=0)
print(f"E: restored step {int(restored.step)} data {data['step']}", flush=True)
ckpt.close()
sys.exit(0)
