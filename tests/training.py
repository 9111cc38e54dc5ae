"""Training equivalence through the loopback engine: hyparflow's `fit` on P x R ranks of
one process against plain Keras `fit(shuffle=False)` on the same global batches, with the
reference's own noise floor, and every tied variable's copies checked bit-identical."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

import hyparflow as hf
from hyparflow import loopback
from hyparflow.settings import Layout


@dataclass
class Result:
    err: float  # max over weights (BatchNorm statistics included) of hyparflow's relative difference from Keras
    floor: float  # the same, Keras against Keras with every batch's rows permuted
    moved: float  # max relative change Keras's training made to a weight
    tied: int  # tied variables whose copies were checked identical

    def __str__(self) -> str:
        return f"err {self.err:.1e} floor {self.floor:.1e} moved {self.moved:.1e} tied {self.tied}"


def max_rel(a, b) -> float:
    """Largest difference of two weight lists, each tensor's relative to its largest value."""
    return max(float(np.abs(u - v).max() / (np.abs(v).max() + 1e-6)) for u, v in zip(a, b))


class _Snapshot(keras.callbacks.Callback):
    """Each rank's own weights at the end of training, before the stages are gathered."""

    def on_train_end(self, logs=None):
        self.weights = self.model.get_weights()


def _rows(data, order):
    return [d[order] for d in data] if isinstance(data, list) else data[order]


def train_like_keras(
    build,
    x,
    y,
    num_partitions: int,
    num_replicas: int = 1,
    num_microbatches: int = 1,
    batch_size: int = 8,
    balance="flops",
) -> Result:
    """Train `build()` (compiled with plain SGD, so a refit from the same weights starts
    afresh) with hyparflow on a loopback grid and with Keras; compare every weight.

    The reference is trained twice, the second time with each batch's rows permuted: the
    same mathematics summed in another order, whose distance is Keras's own noise floor.
    Every variable tied across stages must be bit-identical on all its holders, and held
    by exactly its stages' ranks (the others keep the initial value)."""
    ranks = num_partitions * num_replicas
    models = [build() for _ in range(ranks + 1)]
    ref = models.pop()
    initial = ref.get_weights()
    ref.fit(x, y, batch_size=batch_size, shuffle=False, verbose=0)
    want = ref.get_weights()
    n = len(y[0] if isinstance(y, list) else y)
    order = np.concatenate(
        [
            s + np.random.default_rng(s).permutation(len(b))
            for s, b in ((s, np.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size))
        ]
    )
    ref.set_weights(initial)
    ref.fit(_rows(x, order), _rows(y, order), batch_size=batch_size, shuffle=False, verbose=0)
    floor = max_rel(ref.get_weights(), want)
    snapshots = [_Snapshot() for _ in range(ranks)]
    loopback.run(
        ranks,
        lambda comm: hf.fit(
            models[comm.Get_rank()],
            x,
            y,
            batch_size=batch_size,
            num_partitions=num_partitions,
            num_microbatches=num_microbatches,
            shuffle=False,
            verbose=0,
            balance=balance,
            callbacks=[snapshots[comm.Get_rank()]],
            comm=comm,
        ),
    )
    chunks = Layout.resolve(ranks, num_partitions, num_replicas, num_microbatches).virtual_stages  # HYPARFLOW_*
    tied = hf.plan(models[0], num_partitions * chunks, balance=balance).tied
    index = {id(v): i for i, v in enumerate(models[0].weights)}
    for v, stages in tied:
        i = index[id(v)]
        held = [s.weights[i] for s in snapshots if not np.array_equal(s.weights[i], initial[i])]
        holders = len({s % num_partitions for s in stages}) * num_replicas  # stage s is on pipeline rank s % P
        assert len(held) == holders, f"{v.path}: {len(held)} ranks changed it, not its stages'"
        for copy in held[1:]:
            np.testing.assert_array_equal(copy, held[0], err_msg=f"{v.path}: tied copies differ")
    return Result(max_rel(models[0].get_weights(), want), floor, max_rel(initial, want), len(tied))
