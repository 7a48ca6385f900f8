"""Training prompts as a grain pipeline: shard -> shuffle -> repeat -> batch, checkpointable.

    it = prompt_batches(records, batch_size=64, seed=0, shard_index=jax.process_index(),
                        shard_count=jax.process_count())
    batch = next(it)             # list of batch_size record dicts
    state = it.get_state()       # JSON-serialisable; store it in the checkpoint
    it.set_state(state)          # the same batches follow, exactly

Each process keeps the records i with i % shard_count == shard_index (disjoint, and together they
cover the dataset), shuffles them with a seed folded with the epoch (grain's `MapDataset.shuffle`
reshuffles each repetition), repeats forever and batches across epoch boundaries. The pipeline is
a grain `MapDataset`, i.e. random access by batch index, so its state is a single integer
position: restoring it is exact by construction and costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain


def prompt_dataset(records: Sequence[dict[str, Any]], batch_size: int, seed: int,
                   shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """The infinite MapDataset of batches (lists of records) for one shard."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if len(records) < shard_count:
    raise ValueError(f"{len(records)} records cannot fill {shard_count} shards")
  ds = grain.MapDataset.source(records)[shard_index::shard_count]
  return ds.shuffle(seed=seed % 2**32).repeat(None).batch(batch_size, batch_fn=list)


class PromptIterator(Iterator[list[dict[str, Any]]]):
  """Iterator over `prompt_dataset` with an exact, JSON-serialisable state."""

  def __init__(self, dataset: grain.MapDataset, config: dict[str, Any]):
    self._dataset = dataset
    self._config = config  # checked on restore: a state is only valid for the same pipeline
    self._step = 0

  def __next__(self) -> list[dict[str, Any]]:
    batch = self._dataset[self._step]
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, **self._config}

  def set_state(self, state: dict[str, Any]) -> None:
    mismatched = {k: (state.get(k), v) for k, v in self._config.items() if state.get(k) != v}
    if mismatched:
      raise ValueError(
          f"pipeline state was saved for another pipeline: (saved, now) = {mismatched}")
    self._step = int(state["step"])


def prompt_batches(records: Sequence[dict[str, Any]], batch_size: int, seed: int,
                   shard_index: int = 0, shard_count: int = 1) -> PromptIterator:
  """Endless batches of this shard's records; see the module docstring."""
  ds = prompt_dataset(records, batch_size, seed, shard_index, shard_count)
  config = {"batch_size": batch_size, "seed": seed, "shard_index": shard_index,
            "shard_count": shard_count, "num_records": len(records)}
  return PromptIterator(ds, config)
