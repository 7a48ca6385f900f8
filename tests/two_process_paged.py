"""Run by tests/test_paged.py as both processes of a 2-process job (2 CPU devices each): the paged
engine on a mesh of the 4 devices (4 batch shards, each with its own slots and pages) against
the static sampler on this process's own device; prints the share of identical rows."""

import argparse

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from explore_jax import rollout as rollout_lib
from explore_jax.models import qwen2
from explore_jax.rollout import sampling
from explore_jax.tpu import sharding
from test_rollout_engine import COMPARE

exec(COMPARE)

parser = argparse.ArgumentParser()
for key in ("coordinator", "num_processes", "process_id", "cpu_collectives"):
  parser.add_argument(f"--config.distributed.{key}", dest=key)
args = parser.parse_args()
sharding.initialize_distributed(ml_collections.ConfigDict(dict(
    coordinator=args.coordinator, num_processes=int(args.num_processes),
    process_id=int(args.process_id), cpu_collectives=args.cpu_collectives)))
cfg, params = tiny()
tokens, mask = prompts(8)
local = jax.local_devices()[0]
with jax.default_device(local):  # the reference, on this process alone
  free = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(0), max_new_tokens=16,
                              temperature=0.0, eos_id=sampling.NO_EOS)
  eos = int(np.argmax(np.bincount(np.asarray(free.tokens)[:, 2:].ravel(), minlength=128)))
  kw = dict(max_new_tokens=16, eos_id=eos, n=2, top_p=0.9)
  ref = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), **kw)
  ref = jax.tree.map(np.asarray, ref)
mesh = sharding.make_mesh((-1, 1, 1))
params_m = jax.device_put(params, sharding.logical_to_mesh(qwen2.logical_axes(cfg), params, mesh))
rows = NamedSharding(mesh, P("data"))
put = lambda x: jax.make_array_from_callback(x.shape, rows, lambda i: x[i])
# 2 slots and 10 pages of 4 per shard: rows are preempted.
got, stats = rollout_lib.generate(cfg, params_m, put(tokens), put(mask), jax.random.key(1),
                                  mesh=mesh, engine="paged", slots=8, kv_pages=40, page_size=4,
                                  with_stats=True, **kw)
got = jax.tree.map(sharding.to_host, got)
with jax.default_device(local):
  share = compare(cfg, params, ref, got, greedy=False)
print(f"SHARE {share:.3f} PREEMPTED {stats['preemptions']:.0f} ROUND_TRIPS "
      f"{stats['host_round_trips']}", flush=True)
