"""Only the stages that read inputs or targets iterate a stream; a middle stage gets each
batch's size from its replica's leader, and a stream of unknown length ends on the same step
everywhere. Loopback worlds of P=3 x R=2 (stage 1 reads nothing), results equal to Keras."""

from __future__ import annotations

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

X = np.random.default_rng(0).standard_normal((40, 12)).astype("float32")  # batches of 16: 16, 16 and 8
Y = np.random.default_rng(1).integers(0, 3, 40)
LAYOUT = dict(num_partitions=3, num_microbatches=2, balance="flops")


class Steps(keras.callbacks.Callback):
    """Counts the steps every rank runs (a batch hook, so it runs on every rank)."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def grid(call):
    """`call(model, comm, pulls)` on 6 loopback ranks (P=3 x R=2), each with its own model;
    `pulls` counts, per rank, the batches its stream yielded. Returns (models, results, pulls,
    stage of each rank)."""
    models = [cases.compiled("mlp", "sgd") for _ in range(6)]
    pulls: Counter = Counter()
    lock = threading.Lock()

    def counted(comm, batches):
        for batch in batches:
            with lock:
                pulls[comm.Get_rank()] += 1
            yield batch

    def body(comm):
        result = call(models[comm.Get_rank()], comm, lambda batches: counted(comm, batches))
        return result, _SESSIONS[models[comm.Get_rank()]][1].grid.stage

    out = loopback.run(6, body)
    return models, [r for r, _ in out], pulls, [s for _, s in out]


def max_rel(a, b) -> float:
    return max(float(np.abs(u - v).max() / (np.abs(v).max() + 1e-6)) for u, v in zip(a, b))


def test_a_middle_stage_never_pulls_from_a_generator_of_unknown_length():
    def batches():
        for b in range(3):
            yield X[16 * b : 16 * (b + 1)], Y[16 * b : 16 * (b + 1)]

    def call(model, comm, count):
        steps = Steps()
        hf.fit(model, count(batches()), verbose=0, callbacks=[steps], comm=comm, **LAYOUT)
        return steps.steps

    models, steps, pulls, stages = grid(call)
    assert stages.count(1) == 2, "two replicas of the middle stage"
    assert [pulls[r] for r, s in enumerate(stages) if s == 1] == [0, 0], "the middle stage never iterates"
    assert [pulls[r] for r, s in enumerate(stages) if s != 1] == [3] * 4, "readers pull each batch once"
    assert steps == [3] * 6, "every rank runs the stream's 3 steps and stops together at its end"
    ref = cases.compiled("mlp", "sgd")
    ref.fit(batches(), verbose=0)
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5


def test_unknown_cardinality_dataset_ends_together_every_epoch_and_validates():
    def dataset():
        ds = tf.data.Dataset.from_tensor_slices((X, Y)).filter(lambda x, y: True).batch(16)
        assert ds.cardinality() == tf.data.UNKNOWN_CARDINALITY
        return ds

    kw = dict(epochs=2, shuffle=False, verbose=0, validation_data=dataset())

    def call(model, comm, count):
        steps = Steps()
        history = hf.fit(model, dataset(), callbacks=[steps], comm=comm, **kw, **LAYOUT)
        return steps.steps, history.history

    models, results, _, _ = grid(call)
    assert [s for s, _ in results] == [6] * 6, "3 steps (16, 16, 8 samples) in each of 2 epochs, on every rank"
    ref = cases.compiled("mlp", "sgd")
    history = ref.fit(dataset(), **kw).history
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5
    for key, values in history.items():
        assert results[0][1][key] == pytest.approx(values, rel=1e-5, abs=1e-6), key


def test_predict_and_evaluate_read_the_stream_on_the_stages_that_need_it():
    def call(model, comm, count):
        ds = tf.data.Dataset.from_tensor_slices((X, Y)).batch(16)
        preds = hf.predict(model, count(ds.map(lambda x, y: (x,))), verbose=0, comm=comm, **LAYOUT)
        logs = hf.evaluate(model, ds, verbose=0, return_dict=True, comm=comm, **LAYOUT)
        return preds, logs

    _, results, pulls, stages = grid(call)
    reads = [pulls[r] for r in range(6)]
    assert reads == [3 if s == 0 else 0 for s in stages], "predict reads no targets: only stage 0 reads"
    ref = cases.compiled("mlp", "sgd")
    np.testing.assert_allclose(results[0][0], ref.predict(X, batch_size=16, verbose=0), rtol=1e-5, atol=1e-6)
    assert results[3][1] == pytest.approx(ref.evaluate(X, Y, batch_size=16, verbose=0, return_dict=True), rel=1e-5)


@pytest.mark.mpi
def test_under_mpi_only_readers_pull_and_unknown_lengths_end_together(tmp_path):
    from conftest import run_script

    r = run_script(3, "feed.py", tmp=tmp_path, timeout=300)
    ranks = r["generator"]["ranks"]
    assert [f["stage"] for f in ranks] == [0, 1, 2]
    assert [f["pulls"] for f in ranks] == [3, 0, 3], "stage 1 reads no data and never iterates"
    for case in ("generator", "dataset"):  # verbose=1: the bar's logs reduce non-blocking
        assert r[case]["err"] < 1e-5, case
        for key, values in r[case]["ref_history"].items():
            assert r[case]["history"][key] == pytest.approx(values, rel=1e-5, abs=1e-6), (case, key)
