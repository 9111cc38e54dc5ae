"""Each rank holds only its stage: released variables, the gather modes, save, reuse
(4 loopback ranks in one process), and a model that does not fit under a per-process
memory cap (real mpirun)."""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
import pytest
from conftest import SCRIPTS, mpi_env, mpirun
from test_cli import hyparflow

import hyparflow as hf
from hyparflow import loopback, memory, session


def build():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8,))
    x = inputs
    for _ in range(5):
        x = keras.layers.Dense(16, activation="tanh")(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return model


X = np.random.default_rng(0).standard_normal((64, 8)).astype("float32")
Y = np.random.default_rng(1).integers(0, 3, 64)
FIT = dict(batch_size=16, shuffle=False, verbose=0)
GRID = dict(num_partitions=4, num_microbatches=2, balance=[2, 1, 1, 2])
# 2 ranks a replica holding 2 stages each: rank 0 stages 0 and 2, rank 1 stages 1 and 3
INTERLEAVED = dict(num_partitions=2, num_microbatches=2, schedule="interleaved", balance=[2, 1, 1, 2])


def close(a, b) -> bool:
    return len(a) == len(b) and all(np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b))


def test_other_stages_are_released_and_rank0_ends_with_the_trained_model():
    ref = build()
    ref.fit(X, Y, epochs=2, **FIT)
    ref_eval = ref.evaluate(X, Y, verbose=0)
    models = [build() for _ in range(4)]

    def body(comm):
        model = models[comm.Get_rank()]
        hf.fit(model, X, Y, **FIT, **GRID, comm=comm)
        hf.fit(model, X, Y, **FIT, **GRID, comm=comm)  # the session reused
        loss = hf.evaluate(model, X, Y, verbose=0, comm=comm, **GRID)
        s = session._SESSIONS[model][1]
        own = {id(v) for v in s.stage.variables}
        released = {id(v) for v in model.variables if memory.is_released(v)}
        error = ""
        if comm.Get_rank():
            with pytest.raises(memory.ReleasedVariableError) as e:
                model.get_weights()
            error = str(e.value)
        stage = [v.numpy() for v in s.stage.variables]
        return loss, released, {id(v) for v in model.variables} - own, error, stage, s.plan

    results = loopback.run(4, body)
    loss0, released0, _, _, _, plan = results[0]
    assert released0 == set(), "rank 0 holds the whole model after gather='rank0'"
    assert close(models[0].get_weights(), ref.get_weights()), "rank 0's model is not Keras's after two fits"
    assert loss0 == pytest.approx(ref_eval, rel=1e-5)
    for rank, (loss, released, others, error, stage, _) in enumerate(results[1:], 1):
        assert released == others and released, f"rank {rank} must hold exactly its stage's variables"
        assert "gather='all'" in error and "rank 0" in error and "stage" in error, error
        assert loss == loss0
        positions = [i for i, v in enumerate(models[rank].variables) if id(v) not in released]
        assert close(stage, [ref.variables[i].numpy() for i in positions]), f"rank {rank}'s stage weights differ"


class _ReadsWeights(keras.callbacks.Callback):
    """A user's callback that reads the whole model at every epoch's end, on every rank."""

    def on_epoch_end(self, epoch, logs=None):
        self.weights = self.model.get_weights()


def test_a_callback_that_reads_the_model_keeps_it_on_every_rank():
    """After a fit that released other stages, a fit whose callbacks may read the whole model
    (a user's own, EarlyStopping(restore_best_weights=True)) gives every rank all of it."""
    ref = build()
    ref.fit(X, Y, epochs=3, **FIT)
    models = [build() for _ in range(4)]

    def body(comm):
        model = models[comm.Get_rank()]
        hf.fit(model, X, Y, **FIT, **GRID, comm=comm)
        reader = _ReadsWeights()
        stop = keras.callbacks.EarlyStopping("loss", patience=5, restore_best_weights=True)
        hf.fit(model, X, Y, epochs=2, callbacks=[reader, stop], **FIT, **GRID, comm=comm)
        return [memory.is_released(v) for v in model.variables], reader.weights

    for rank, (released, read) in enumerate(loopback.run(4, body)):
        assert not any(released), f"rank {rank} released variables a callback may read"
        assert len(read) == len(ref.weights)
    assert close(models[0].get_weights(), ref.get_weights()), "rank 0's model is not Keras's after 1 + 2 epochs"


@pytest.mark.parametrize("grid", [GRID, INTERLEAVED], ids=["1f1b", "interleaved"])
def test_gather_none_keeps_stages_apart_and_save_writes_the_whole_model(tmp_path, grid):
    ref = build()
    ref.fit(X, Y, epochs=2, **FIT)
    models = [build() for _ in range(4)]
    path = str(tmp_path / "spread.keras")

    def body(comm):
        model = models[comm.Get_rank()]
        hf.fit(model, X, Y, **FIT, **grid, gather="none", comm=comm)
        held = sum(not memory.is_released(v) for v in model.variables)
        hf.save(model, path, comm=comm)
        after_save = sum(not memory.is_released(v) for v in model.variables)
        hf.fit(model, X, Y, **FIT, **grid, gather="all", comm=comm)  # reused: from the stages, to every rank
        weights = model.get_weights()
        hf.fit(model, X, Y, **FIT, **grid, gather="none", comm=comm)
        # a new layout: the weights come back to rank 0 first, then go to the new stages
        loss = hf.evaluate(model, X, Y, verbose=0, num_partitions=2, num_microbatches=1, comm=comm)
        return held, after_save, weights, loss

    results = loopback.run(4, body)
    total = len(models[0].variables)
    for held, after_save, *_ in results:
        assert 0 < held < total and after_save == held, "gather='none' leaves each rank with its stage only"
    saved = keras.saving.load_model(path)
    once = build()
    once.fit(X, Y, epochs=1, **FIT)
    assert close(saved.get_weights(), once.get_weights()), "the saved file is not the model after one fit"
    assert int(saved.optimizer.iterations.numpy()) == 4
    slots = [v.numpy() for v in saved.optimizer.variables]
    assert close(slots, [v.numpy() for v in once.optimizer.variables]), "optimizer slots streamed from the stages"
    for _, _, weights, _ in results:
        assert close(weights, ref.get_weights()), "gather='all' gives every rank the trained model"
    ref.fit(X, Y, **FIT)
    assert results[0][3] == pytest.approx(ref.evaluate(X, Y, verbose=0), rel=1e-5)


def test_plan_reports_memory_per_stage():
    model = build()
    plan = hf.plan(model, 2, balance=[3, 3], microbatch_size=4)
    text = str(plan)
    assert "memory" in text and "optimizer" in text
    est = memory.estimate(plan, model.optimizer, 4)
    weights = sum(int(np.prod(v.shape)) * 4 for v in plan.stages[0].trainable_variables)
    assert est[0].weights == weights and est[0].optimizer == 2 * weights  # Adam: two slots per variable
    assert est[0].accumulators == weights
    direct = memory.estimate(plan, model.optimizer, 4, updates_in_backward=[1])
    assert direct[0] == est[0] and direct[1].accumulators == 0 and direct[1].gradients > est[1].gradients
    assert memory.slots_per_variable(keras.optimizers.SGD(momentum=0.9)) == 1
    assert memory.slots_per_variable(keras.optimizers.SGD()) == 0


@pytest.mark.mpi
def test_a_model_too_large_for_one_process_trains_on_four(tmp_path):
    """Under the same per-process cap on data memory (RLIMIT_DATA), plain Keras runs out
    of memory and hyparflow at P=4 trains the model and saves it whole."""
    script = [sys.executable, str(SCRIPTS / "memory_cap.py")]
    keras_run = mpirun(1, script + ["keras"], check=False, env=mpi_env())
    # TensorFlow raises the allocation failure as a MemoryError, or, in one of its own threads, aborts with it.
    out_of_memory = "OUT OF MEMORY" in keras_run.stdout or "std::bad_alloc" in keras_run.stderr
    assert keras_run.returncode != 0 and out_of_memory, keras_run.stdout[-2000:] + keras_run.stderr[-2000:]
    hf_run = mpirun(4, script + ["hyparflow", str(tmp_path / "big.keras")], env=mpi_env())
    assert "TRAINED" in hf_run.stdout, hf_run.stdout[-2000:]
    saved = keras.saving.load_model(tmp_path / "big.keras")
    assert len(saved.layers) == 18 and int(saved.optimizer.iterations.numpy()) == 2


@pytest.mark.mpi
def test_bench_memory_reports_peaks_and_the_estimate(tmp_path):
    out = hyparflow(
        "bench", "--memory", "--memory-models", "mlp-tiny", "--memory-configs", "2x2:none", "--repeats", "1",
        "--out", str(tmp_path), timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "memory.json").read_text())["mlp-tiny"]
    assert report["baseline_mb"] > 0 and report["keras_above_mb"] > 0
    row = report["variants"]["hyparflow P=2 M=2 gather=none"]
    assert len(row["peak_mb"]) == 2 and all(p > report["baseline_mb"] / 2 for p in row["peak_mb"])
    assert [r["weights"] > 0 for r in row["stage_estimate"]] == [True, True]
    assert row["loss"] == pytest.approx(report["variants"]["keras"]["loss"], rel=1e-5)


def _wide(depth: int):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((512,))
    x = inputs
    for _ in range(depth):
        x = keras.layers.Dense(512, use_bias=False)(x)  # 1 MB per variable
    model = keras.Model(inputs, x)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    return model


def _epoch_memory(depth: int, num_microbatches: int, recompute: bool = False) -> tuple[float, list]:
    """Train `_wide(depth)` for three epochs at P=2 on 2 loopback ranks in one process; returns
    how far the process's allocations rose in the last epoch above where they stood at
    its start (MB), and each stage's accumulators."""
    import tensorflow as tf

    class Probe(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            tf.config.experimental.reset_memory_stats("CPU:0")
            self.live = tf.config.experimental.get_memory_info("CPU:0")["current"] / 2**20

        def on_epoch_end(self, epoch, logs=None):
            self.rise = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20 - self.live

    models, probe = [_wide(depth) for _ in range(2)], Probe()
    x = np.random.default_rng(0).standard_normal((64, 512)).astype("float32")

    def body(comm):
        callbacks = [probe] if comm.Get_rank() == 0 else []
        hf.fit(models[comm.Get_rank()], x, x, batch_size=32, epochs=3, shuffle=False, verbose=0, num_partitions=2,
               num_microbatches=num_microbatches, recompute=recompute, gather="none", callbacks=callbacks,
               comm=comm)  # fmt: skip

    loopback.run(2, body)
    return probe.rise, [session._SESSIONS[m][1].compute.acc for m in models]


def test_gradients_in_flight_stay_a_few_variables_not_a_stage():
    """The backward adds each variable's gradient into its accumulator inside the compiled
    step, and the optimizer updates one variable after another: over a training epoch the
    process's allocations rise above the live state by a few variables, not by a stage's
    gradients (12 MB here)."""
    rise, _ = _epoch_memory(24, num_microbatches=2)
    assert 0 < rise < 8, f"allocations rose {rise:.1f} MB above the live state in an epoch"


def test_one_microbatch_updates_in_the_backward_without_accumulators():
    """With one micro-batch and nothing to reduce, each stage's optimizer runs inside its
    compiled backward (recomputed on the first stage), as Keras's train_step runs it: no
    accumulators are made, and the gradients in flight stay a few variables, not a stage's
    (24 MB here: TensorFlow runs a compiled function without outputs, as a first stage's
    recomputed backward would be, in an order that keeps them all)."""
    rise, acc = _epoch_memory(48, num_microbatches=1, recompute=True)
    assert acc == [[], []]
    assert 0 < rise < 16, f"allocations rose {rise:.1f} MB above the live state in an epoch"
