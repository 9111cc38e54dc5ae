"""Per-replica input pipelines, as `tf.distribute.Strategy.distribute_datasets_from_function`:
each replica builds and iterates only its own dataset, so decoding and augmentation do not
grow with the number of replicas.

Global batch k is the concatenation, in replica order, of every replica's k-th batch. Only
the ranks of replica r that read data (see `hyparflow.feed`) call `dataset_fn` with replica
r's context. Each step, the reading ranks of a stage sum their batch sizes and loss
divisors over the replicas in one small allreduce, so the loss is normalised over the global
batch as in Keras and a replica whose dataset ends first ends the epoch on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hyparflow.errors import ConfigError


@dataclass(frozen=True)
class InputContext:
    """What `dataset_fn` learns about its replica (names as `tf.distribute.InputContext`)."""

    num_replicas_in_sync: int
    input_pipeline_id: int

    @property
    def num_input_pipelines(self) -> int:
        return self.num_replicas_in_sync

    @property
    def num_replicas(self) -> int:
        return self.num_replicas_in_sync

    @property
    def replica_id(self) -> int:
        return self.input_pipeline_id

    def get_per_replica_batch_size(self, global_batch_size: int) -> int:
        """The share of each replica in a global batch (it must divide evenly, as in TensorFlow)."""
        if global_batch_size % self.num_replicas_in_sync:
            raise ConfigError(
                f"The global batch size {global_batch_size} does not divide by the "
                f"{self.num_replicas_in_sync} replicas."
            )
        return global_batch_size // self.num_replicas_in_sync

    per_replica_batch_size = get_per_replica_batch_size


class PerReplica:
    """A per-replica input pipeline for `hyparflow.fit` / `evaluate` (`x` or
    `validation_data`): `dataset_fn(context)` returns replica `context.replica_id`'s dataset
    (a batched `tf.data.Dataset`, `keras.utils.PyDataset` or generator) yielding that
    replica's share of each global batch."""

    def __init__(self, dataset_fn: Callable[[InputContext], Any]):
        if not callable(dataset_fn):
            raise ConfigError(f"PerReplica takes a function context -> dataset, got {type(dataset_fn).__name__}.")
        self.dataset_fn = dataset_fn

    def open(self, context: InputContext) -> Any:
        """Replica `context.replica_id`'s dataset."""
        dataset = self.dataset_fn(context)
        if dataset is None:
            name = getattr(self.dataset_fn, "__name__", "dataset_fn")
            raise ConfigError(f"PerReplica's {name}(context) returned None: return the replica's dataset.")
        return dataset


@dataclass(frozen=True)
class Shares:
    """One global batch assembled from the replicas' batches: each replica's sample count,
    and the loss divisors of the whole global batch (`Objective.divisors`)."""

    sizes: np.ndarray
    divisors: np.ndarray
