"""`hyparflow.PerReplica`: each replica builds and reads only its own dataset; global batch k
is every replica's k-th batch in replica order, and training equals Keras on those batches."""

from __future__ import annotations

import json
import threading
from collections import Counter

import cases
import keras
import numpy as np
import pytest
import tensorflow as tf

import hyparflow as hf
from hyparflow import loopback
from hyparflow.session import _SESSIONS

X = np.random.default_rng(0).standard_normal((40, 12)).astype("float32")
Y = np.random.default_rng(1).integers(0, 3, 40)
SW = np.random.default_rng(2).uniform(0.2, 2.0, 40).astype("float32")
R, B = 2, 8  # replica r reads samples r::2 in batches of 8: global batches of 16, 16 and 8


def replica_dataset(context):
    ds = tf.data.Dataset.from_tensor_slices((X, Y, SW)).shard(context.num_input_pipelines, context.input_pipeline_id)
    return ds.batch(context.get_per_replica_batch_size(B * R))


def uneven_dataset(context):
    """Replica 0 reads rows 0-23 in batches of 8, replica 1 rows 24-39 in 6, 6 and 4."""
    rows = slice(0, 24) if context.replica_id == 0 else slice(24, 40)
    return tf.data.Dataset.from_tensor_slices((X[rows], Y[rows], SW[rows])).batch(8 if context.replica_id == 0 else 6)


def global_order(dataset_fn=replica_dataset) -> tuple[np.ndarray, int]:
    """The sample order of the global batches (each step, replica 0's batch then replica 1's),
    and the size of all but the last."""
    if dataset_fn is replica_dataset:
        shards = [np.arange(40)[r::R] for r in range(R)]
        return np.concatenate([s[k : k + B] for k in range(0, 20, B) for s in shards]), B * R
    steps = [(np.arange(8 * k, 8 * k + 8), np.arange(24 + 6 * k, min(30 + 6 * k, 40))) for k in range(3)]
    return np.concatenate([np.concatenate(pair) for pair in steps]), 14


def max_rel(a, b) -> float:
    return max(float(np.abs(u - v).max() / (np.abs(v).max() + 1e-6)) for u, v in zip(a, b))


def compiled(reduction: str = "sum_over_batch_size"):
    model = cases.zoo.mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, metrics=["accuracy"])
    return model


def run_grid(size, call, reduction: str = "sum_over_batch_size"):
    models = [compiled(reduction) for _ in range(size)]
    out = loopback.run(size, lambda comm: call(models[comm.Get_rank()], comm))
    return models, out


@pytest.mark.parametrize(
    "layout, dataset_fn, reduction",
    [
        (dict(num_partitions=1), uneven_dataset, "mean_with_sample_weight"),  # divisor: the global weight sum
        (dict(num_partitions=2, num_microbatches=2), replica_dataset, "sum_over_batch_size"),
    ],
)
def test_per_replica_datasets_train_as_keras_on_the_concatenated_batches(layout, dataset_fn, reduction):
    data = hf.PerReplica(dataset_fn)

    def call(model, comm):
        history = hf.fit(model, data, epochs=2, validation_data=data, verbose=0, comm=comm, **layout)
        return history.history, hf.evaluate(model, data, verbose=0, return_dict=True, comm=comm, **layout)

    models, out = run_grid(R * layout["num_partitions"], call, reduction)
    ref = compiled(reduction)
    order, batch = global_order(dataset_fn)
    xg, yg, swg = X[order], Y[order], SW[order]
    kw = dict(batch_size=batch, sample_weight=swg)
    history = ref.fit(xg, yg, epochs=2, shuffle=False, validation_data=(xg, yg, swg), verbose=0, **kw).history
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5
    for key, values in history.items():
        for hist, _ in out:
            assert hist[key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
    logs = ref.evaluate(xg, yg, verbose=0, return_dict=True, **kw)
    assert out[-1][1] == pytest.approx(logs, rel=1e-5)


def test_only_each_replicas_readers_build_and_pull_its_dataset():
    """P=3 x R=2: the middle stage reads nothing and never builds nor pulls a dataset."""
    calls, pulls, ranks = [], Counter(), {}
    lock = threading.Lock()

    def dataset_fn(context):
        rank = ranks[threading.get_ident()]
        with lock:
            calls.append((rank, context.replica_id, context.num_replicas))

        def batches():
            for x, y, sw in replica_dataset(context).as_numpy_iterator():
                with lock:
                    pulls[rank] += 1
                yield x, y, sw

        return batches()

    def call(model, comm):
        ranks[threading.get_ident()] = comm.Get_rank()
        hf.fit(model, hf.PerReplica(dataset_fn), verbose=0, comm=comm, num_partitions=3, num_microbatches=2)
        grid = _SESSIONS[model][1].grid
        return grid.replica, grid.stage

    models, where = run_grid(6, call)
    readers = [rank for rank, (_, stage) in enumerate(where) if stage != 1]
    assert sorted(calls) == sorted((rank, where[rank][0], 2) for rank in readers), "one call per reading rank"
    assert {rank: pulls[rank] for rank in range(6)} == {rank: 3 if rank in readers else 0 for rank in range(6)}
    ref = compiled()
    order, batch = global_order()
    ref.fit(X[order], Y[order], sample_weight=SW[order], batch_size=batch, shuffle=False, verbose=0)
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5


@pytest.mark.parametrize("known, partitions", [(False, 3), (True, 1)])
def test_a_replica_that_runs_out_first_ends_the_epoch_on_every_rank(caplog, known, partitions):
    """Replica 0 has 3 batches, replica 1 two (of unknown length through P=3 stages, the middle
    one reading nothing; or of known length): every rank runs 2 steps an epoch, and rank 0 warns."""

    def dataset_fn(context):
        ds = replica_dataset(context).take(3 - context.replica_id)
        return ds if known else ds.filter(lambda *_: True)

    def call(model, comm):
        history = hf.fit(
            model, hf.PerReplica(dataset_fn), epochs=2, verbose=0, comm=comm, num_partitions=partitions,
            num_microbatches=2,
        )  # fmt: skip
        return history.history["loss"], model.optimizer.iterations.numpy()

    result: list = []
    worker = threading.Thread(target=lambda: result.append(run_grid(partitions * R, call)), daemon=True)
    worker.start()
    worker.join(timeout=240)
    assert result, "the ranks hang"
    _, out = result[0]
    assert [int(it) for _, it in out] == [4] * partitions * R, "2 steps in each of 2 epochs on every rank"
    assert ("fewest" if known else "ran out") in caplog.text


def test_bad_per_replica_input_is_refused_clearly():
    with pytest.raises(hf.ConfigError, match="function"):
        hf.PerReplica(replica_dataset(hf.InputContext(1, 0)))

    def call(model, comm):
        with pytest.raises(hf.ConfigError, match="returned None"):
            hf.fit(model, hf.PerReplica(lambda context: None), verbose=0, comm=comm)
        with pytest.raises(hf.ConfigError, match="predict"):
            hf.predict(model, hf.PerReplica(replica_dataset), verbose=0, comm=comm)
        return True

    assert run_grid(R, call)[1] == [True, True]


@pytest.mark.mpi
def test_bench_input_per_replica_pipelines_map_each_sample_once_under_mpi(tmp_path):
    """Two real MPI ranks: a global pipeline maps every sample on both, PerReplica each half;
    the global batches hold the same samples, so the loss agrees."""
    from test_cli import hyparflow

    out = hyparflow(
        "bench", "--input", "--input-replicas", "2", "--input-samples", "64", "--input-work", "1", "--repeats", "1",
        "--batch-size", "16", "--out", str(tmp_path), timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "input.json").read_text())
    assert report["global R=2"]["map_calls_per_rank"] == 64
    assert report["per-replica R=2"]["map_calls_per_rank"] == 32
    assert report["per-replica R=2"]["loss"] == pytest.approx(report["global R=2"]["loss"], rel=1e-5)
