"""The real engine (stages, schedule, executor, reducer) on 4 loopback ranks in one
process: the equivalence cases of tests/cases.py, and the loopback transport itself."""

from __future__ import annotations

import cases
import numpy as np
import pytest

import hyparflow as hf
from hyparflow import loopback


def run_case(key: str):
    spec = cases.CASES[key]
    models = [cases.compiled(spec[0], spec[4]) for _ in range(4)]  # built here: seeding is global
    histories = loopback.run(4, lambda comm: cases.fit(models[comm.Get_rank()], key, comm))
    return models, histories


@pytest.mark.parametrize("key", list(cases.CASES))
def test_weights_equal_plain_keras(key, monkeypatch):
    monkeypatch.setenv("HYPARFLOW_BUCKET_MB", "0.0001")  # a gradient bucket per variable (MPI runs use one)
    models, histories = run_case(key)
    r = cases.compare(key, models[0], histories[0])
    assert r["moved"] > 1e-3, "training did not change the weights"
    assert r["err"] < 1e-4, f"max relative weight difference {r['err']:.2e}"
    for key_ in r["ref_history"]:
        assert r["history"][key_] == pytest.approx(r["ref_history"][key_], rel=1e-5, abs=1e-6), key_
    for h in histories[1:]:
        assert h.history == histories[0].history, "every rank reports the same logs"


def test_collectives_reduce_in_rank_order_and_messages_match_in_posting_order():
    def body(comm):
        me = comm.Get_rank()
        out = np.empty(3)
        comm.Iallreduce(np.full(3, me + 1.0), out).Wait()
        bufs = [np.empty(2) for _ in range(3)]
        reqs = [comm.Irecv(b, source=(me - 1) % 3, tag=7) for b in bufs]
        for k in range(3):
            comm.Isend(np.full(2, 10.0 * me + k), dest=(me + 1) % 3, tag=7)
        for req in reversed(reqs):
            req.Wait()
        return out.tolist(), [b[0] for b in bufs], comm.allgather(me), comm.bcast(me * 5, root=2)

    for me, (total, got, gathered, value) in enumerate(loopback.run(3, body)):
        assert total == [6.0, 6.0, 6.0]
        assert got == [10.0 * ((me - 1) % 3) + k for k in range(3)]
        assert gathered == [0, 1, 2] and value == 10


def test_a_failing_rank_fails_the_world_instead_of_hanging():
    def body(comm):
        if comm.Get_rank() == 1:
            raise ValueError("boom on rank 1")
        comm.allgather(0)  # rank 1 never arrives

    with pytest.raises(RuntimeError, match="loopback rank 1 failed: ValueError: boom on rank 1"):
        loopback.run(3, body)


# ---- fit's keywords on a grid, against Keras ---------------------------------------------
X = np.random.default_rng(0).standard_normal((48, 12)).astype("float32")
Y = np.random.default_rng(1).integers(0, 3, 48)


def grid_fit(build, ranks: int, **kw):
    """hf.fit of `ranks` copies of `build()` on a loopback world; returns models, histories."""
    models = [build() for _ in range(ranks)]
    kw = {"batch_size": 16, "shuffle": False, "verbose": 0, "balance": "flops"} | kw
    histories = loopback.run(ranks, lambda comm: hf.fit(models[comm.Get_rank()], X, Y, comm=comm, **kw))
    return models, histories


def mlp():
    return cases.compiled("mlp", "sgd")


def max_rel(a, b) -> float:
    return max(float(np.abs(u - v).max() / (np.abs(v).max() + 1e-6)) for u, v in zip(a, b))


@pytest.mark.parametrize("policy", ["pipeline", "replica"])
def test_gather_all_gives_every_rank_the_trained_weights(policy):
    models, _ = grid_fit(mlp, 4, num_partitions=2, num_microbatches=2, gather="all", placement_policy=policy)
    ref = mlp()
    ref.fit(X, Y, batch_size=16, shuffle=False, verbose=0)
    for r, m in enumerate(models):
        assert max_rel(m.get_weights(), ref.get_weights()) < 1e-5, f"rank {r} ({policy} placement)"


def test_validation_split_history_equals_keras():
    models, histories = grid_fit(mlp, 4, num_partitions=2, epochs=2, validation_split=0.25)
    ref = mlp()
    href = ref.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_split=0.25)
    assert sorted(histories[0].history) == sorted(href.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    for key, values in href.history.items():
        assert histories[0].history[key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5


def test_class_weight_equals_keras():
    weights = {0: 1.0, 1: 2.5, 2: 0.5}
    models, histories = grid_fit(mlp, 4, num_partitions=2, num_microbatches=2, class_weight=weights)
    ref = mlp()
    href = ref.fit(X, Y, batch_size=16, shuffle=False, verbose=0, class_weight=weights)
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5
    assert histories[0].history["loss"] == pytest.approx(href.history["loss"], rel=1e-5)


def test_steps_per_epoch_continues_through_the_data():
    """2 epochs of 2 steps over 3 batches of data: the 4th step wraps to the first batch."""
    models, histories = grid_fit(mlp, 2, num_partitions=2, epochs=2, steps_per_epoch=2)
    ref = mlp()
    ref.fit(np.concatenate([X, X[:16]]), np.concatenate([Y, Y[:16]]), batch_size=16, shuffle=False, verbose=0)
    assert len(histories[0].history["loss"]) == 2
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5


def test_batchnorm_statistics_are_averaged_across_replicas():
    """With a zero learning rate the weights stay put, so each replica's moving statistics
    are those plain Keras computes on that replica's halves of the batches; hyparflow
    must end with their mean on every replica."""

    def bn_model():
        import keras

        keras.utils.set_random_seed(3)
        inp = keras.Input((12,))
        out = keras.layers.Dense(3)(keras.layers.BatchNormalization(momentum=0.5)(keras.layers.Dense(6)(inp)))
        model = keras.Model(inp, out)
        model.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        return model

    models, _ = grid_fit(bn_model, 2, num_partitions=1, gather="all")
    per_replica = []
    for r in range(2):
        rows = np.concatenate([np.array_split(np.arange(b, b + 16), 2)[r] for b in range(0, 48, 16)])
        ref = bn_model()
        ref.fit(X[rows], Y[rows], batch_size=8, shuffle=False, verbose=0)
        per_replica.append(ref.layers[2].moving_mean.numpy())
    expected = np.mean(per_replica, axis=0)
    assert not np.allclose(per_replica[0], per_replica[1]), "the replicas saw different data"
    for m in models:
        np.testing.assert_allclose(m.layers[2].moving_mean.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_layer_whose_run_time_shape_is_not_its_symbolic_one_is_named_at_a_cut():
    """Transfers are sized by Keras's symbolic shapes; a layer whose compute_output_shape
    is wrong (keras_hub's XLNet attention mask is one) gets a clear error naming it."""
    import keras

    class Doubled(keras.layers.Layer):
        def call(self, x):
            return keras.ops.concatenate([x, x], axis=-1)

        def compute_output_shape(self, shape):
            return shape  # wrong: the last dimension doubles

    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((12,))
        x = Doubled(name="doubled")(keras.layers.Dense(4)(inp))
        model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(4)(x)))
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    with pytest.raises(Exception, match=r"'doubled' has per-sample shape and dtype \(\(8,\), 'float32'\) at run"):
        grid_fit(build, 2, num_partitions=2, balance=[2, 2])


def test_a_tensor_whose_first_axis_is_not_the_batch_is_named_at_a_cut():
    """A layer that folds another axis into the batch's (video models fold frames) keeps
    the symbolic shape (None, ...); sent between stages, it gets a clear error."""
    import keras

    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((12,))
        x = keras.layers.Dense(8)(inp)
        x = keras.layers.Lambda(lambda t: keras.ops.reshape(t, (-1, 4)), output_shape=(4,), name="fold")(x)
        x = keras.layers.Dense(4)(x)
        x = keras.layers.Lambda(lambda t: keras.ops.reshape(t, (-1, 8)), output_shape=(8,), name="unfold")(x)
        model = keras.Model(inp, keras.layers.Dense(3)(x))
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    with pytest.raises(Exception, match="'fold' has 32 rows at run time for a micro-batch of 16 samples"):
        grid_fit(build, 2, num_partitions=2, balance=[2, 3])


@pytest.mark.parametrize("dtype", ["int32", "float32"])
def test_model_inputs_are_cast_to_their_input_dtype_before_crossing_a_cut(dtype):
    """NumPy's int64 and float64 arrays for int32 and float32 inputs, which cross to stage 1
    as they came: cast as Keras casts them, they are sent as the symbolic dtype says."""
    import keras
    from training import train_like_keras

    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,), dtype=dtype)
        x = keras.layers.Identity()(inp)
        x = keras.layers.Embedding(10, 4)(x) if dtype == "int32" else keras.layers.Dense(4)(x)
        model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, (16, 6)) if dtype == "int32" else rng.standard_normal((16, 6))
    result = train_like_keras(build, x, rng.integers(0, 3, 16), num_partitions=2, balance=[1, 3])
    assert result.err < 1e-5, result


@pytest.mark.parametrize("stateful", [False, True])
def test_a_backward_sends_its_input_gradients_before_it_computes_its_weight_gradients(stateful, monkeypatch):
    """The stage before starts its backward while this one computes its variables'
    gradients: on a split middle stage and on the fused last one, each backward's send
    comes before its kernel's gradient is made (each stage holds one logging layer). A
    stateful op in a weight gradient runs in the order TensorFlow gives it, and trains."""
    import keras
    import tensorflow as tf

    from hyparflow.executor import Executor

    events: list[tuple[int | str, str]] = []

    class LoggedDense(keras.layers.Dense):
        def call(self, x):
            name = self.name

            @tf.custom_gradient
            def matmul(x, w):
                def grad(dy):
                    dx, dw = tf.matmul(dy, w, transpose_b=True), tf.matmul(x, dy, transpose_a=True)
                    log = lambda g: events.append((name, "weights")) or g  # noqa: E731
                    return dx, tf.ensure_shape(tf.numpy_function(log, [dw], dw.dtype, stateful=stateful), dw.shape)

                return tf.matmul(x, w), grad

            return matmul(x, tf.convert_to_tensor(self.kernel)) + self.bias

    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((12,))
        x = LoggedDense(16, name="s0")(inp)
        x = LoggedDense(16, name="s1")(x)
        model = keras.Model(inp, LoggedDense(3, name="s2")(x))
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    sent = Executor._send_input_gradients

    def logged(self, pending, chunk, grads):
        events.append((self.grid.stage, "sent"))
        sent(self, pending, chunk, grads)

    monkeypatch.setattr(Executor, "_send_input_gradients", logged)
    models, _ = grid_fit(build, 3, num_partitions=3, num_microbatches=2, balance=[1, 1, 1], gather="all")
    steps = len(X) // 16
    expected = ["sent", "weights"] * 2 * steps
    for stage in (1, 2):
        mine = [what for who, what in events if who in (stage, f"s{stage}")]
        assert (sorted(mine) if stateful else mine) == (sorted(expected) if stateful else expected), stage
    ref = build()
    ref.fit(X, Y, batch_size=16, shuffle=False, verbose=0)
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5


def test_interleaved_evaluate_and_predict_equal_keras(monkeypatch):
    """Under HYPARFLOW_SCHEDULE=interleaved (what `hyparflow run --schedule interleaved` sets)
    evaluate and predict run every micro-batch through each rank's stages too, and a model
    whose two outputs come from stages on different ranks is assembled in Keras's order."""
    from hyparflow import session

    monkeypatch.setenv("HYPARFLOW_SCHEDULE", "interleaved")
    models = [cases.compiled("multi_io", "adam") for _ in range(2)]
    x, y, _ = cases.data("interleaved multi_io P2 R2 M2 sample weights")
    grid = dict(batch_size=16, verbose=0, num_partitions=2, num_microbatches=2, balance="flops")

    def body(comm):
        model = models[comm.Get_rank()]
        hf.fit(model, x, y, shuffle=False, comm=comm, **grid)
        held = session._SESSIONS[model][1]
        scores = hf.evaluate(model, x, y, return_dict=True, comm=comm, **grid)
        outputs = hf.predict(model, x, comm=comm, **grid)
        return held.grid.stages, held.stage.model_outputs, scores, outputs

    results = loopback.run(2, body)
    assert [r[0] for r in results] == [(0, 2), (1, 3)]
    assert sorted(o for r in results for o in r[1]) == [0, 1]
    trained = models[0]  # rank 0 holds the whole trained model
    want_scores = trained.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    want = trained.predict(x, batch_size=16, verbose=0)
    for _, _, scores, outputs in results:
        assert scores == pytest.approx(want_scores, rel=1e-5)
        for ours, theirs in zip(outputs, want):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
