"""The objective against Keras on a whole batch, in one process: micro-batch losses,
normalised by `Objective.divisors` of the global batch, must sum to `model.compute_loss`
for every reduction, sample-weight shape and mask; metrics updated per micro-batch must
report what Keras reports."""

from __future__ import annotations

import keras
import losszoo
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from hyparflow.errors import ConfigError
from hyparflow.keras_compat import get_keras_mask
from hyparflow.objective import Objective

N = 10  # split into uneven micro-batches of 4, 3, 3


def classifier(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,), name="x")
    return keras.Model(inp, layers.Dense(4, name="out")(layers.Dense(8, activation="tanh")(inp)), name="clf")


def _data(kind: str):
    """(model, x list, y, per-sample weights, dense weights) for one output kind."""
    rng = np.random.default_rng(7)
    if kind in ("token", "token_masked"):
        model = losszoo.causal_lm(mask="zero" if kind == "token_masked" else None)
        x, y, pad = losszoo.lm_data(N, seed=3)
        dense = (pad * rng.uniform(0.2, 2.0, pad.shape)).astype("float32")
        return model, [x], y, rng.uniform(0.2, 2.0, N).astype("float32"), dense
    if kind == "pixel":
        model = losszoo.unet()
        x, y = losszoo.unet_data(N, seed=3)
        return model, [x], y, rng.uniform(0.2, 2.0, N).astype("float32"), rng.uniform(0, 2, y.shape).astype("float32")
    model = classifier()
    x = rng.standard_normal((N, 5)).astype("float32")
    return model, [x], rng.integers(0, 4, N), rng.uniform(0.2, 2.0, N).astype("float32"), None


def _objective(model, xs, ys):
    return Objective(model, model.output_names, [x[:2] for x in xs], [y[:2] for y in ys], list(model.outputs))


def _ours(model, xs, ys, sws):
    """Sum of micro-batch losses (4, 3, 3 samples), each normalised by the global batch."""
    obj = _objective(model, xs, ys)
    idx = np.arange(N)
    divisors = tf.constant(obj.divisors(xs, ys, sws, idx), tf.float32)
    total, positions = 0.0, list(range(len(ys)))
    for part in np.array_split(idx, 3):
        preds = keras.tree.flatten(model([x[part] for x in xs] if len(xs) > 1 else xs[0][part]))
        ys_mb = [tf.constant(y[part]) for y in ys]
        sws_mb = [None if w is None else tf.constant(w[part]) for w in sws]
        loss, _ = obj.stage_loss(positions, ys_mb, preds, sws_mb, divisors)
        total += float(loss)
    return total


def _keras(model, xs, y, sw):
    xs = xs if len(xs) > 1 else xs[0]
    y_pred = model(xs)
    return float(model.compute_loss(xs, y, y_pred, sw))


LOSSES = {
    "sum_over_batch_size": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    "sum": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"),
    "mean_with_sample_weight": lambda: keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    ),
    "ignore_class": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
    "ignore_class_weighted_mean": lambda: keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=0, reduction="mean_with_sample_weight"
    ),
    "string": lambda: "sparse_categorical_crossentropy",
}


# A per-sample loss has no dense (per-element) weights: that combination does not exist.
COMBINATIONS = [
    (k, w)
    for k in ("sample", "token", "token_masked", "pixel")
    for w in ("none", "per_sample", "dense")
    if not (k == "sample" and w == "dense")
]


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("kind, weights", COMBINATIONS)
def test_micro_batches_sum_to_keras_loss(kind, loss, weights):
    model, xs, y, per_sample, dense = _data(kind)
    sw = {"none": None, "per_sample": per_sample, "dense": dense}[weights]
    assert weights != "dense" or sw is not None
    model.compile("sgd", LOSSES[loss]())
    try:
        ref = _keras(model, xs, y, sw)
    except (ValueError, tf.errors.InvalidArgumentError):
        # Keras refuses (B,) weights for a (B, seq) loss; so do we, with the same broadcast.
        with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
            _ours(model, xs, [y], [sw])
        return
    assert _ours(model, xs, [y], [sw]) == pytest.approx(ref, rel=1e-5)


class HalfSquare(keras.losses.Loss):
    """A custom Loss subclass with a per-position result."""

    def call(self, y_true, y_pred):
        return 0.5 * keras.ops.sum(keras.ops.square(y_pred - y_true), axis=-1)


def plain_mse(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


@pytest.mark.parametrize(
    "loss", [HalfSquare(reduction="sum"), HalfSquare(), HalfSquare(reduction="mean_with_sample_weight"), plain_mse]
)
def test_custom_losses_and_functions(loss):
    keras.utils.set_random_seed(0)
    inp = keras.Input((3, 4))
    model = keras.Model(inp, layers.Dense(2)(inp))
    model.compile("sgd", loss)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((N, 3, 4)).astype("float32"), rng.standard_normal((N, 3, 2)).astype("float32")
    sw = rng.uniform(0.1, 2, (N, 3)).astype("float32")
    for w in (None, sw):
        assert _ours(model, [x], [y], [w]) == pytest.approx(_keras(model, [x], y, w), rel=1e-5)


def test_loss_weights_dict_losses_and_an_output_without_loss():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,), name="x")
    h = layers.Dense(8, activation="tanh")(inp)
    seq = layers.Reshape((4, 2))(layers.Dense(8)(h))
    outputs = [layers.Dense(3, name="cls")(h), layers.Dense(5, name="tok")(seq), layers.Dense(2, name="aux")(h)]
    model = keras.Model(inp, outputs)
    model.compile(
        "sgd",
        loss={
            "cls": "sparse_categorical_crossentropy",
            "tok": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "aux": None,
        },
        loss_weights={"cls": 0.3, "tok": 2.0, "aux": 1.0},
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, 5)).astype("float32")
    ys = [rng.integers(0, 3, N), rng.integers(0, 5, (N, 4)), rng.standard_normal((N, 2)).astype("float32")]
    sws = [rng.uniform(0.5, 1.5, N).astype("float32"), rng.uniform(0, 1, (N, 4)).astype("float32"), None]
    ref = float(model.compute_loss(x, ys, model(x), sws))
    assert _ours(model, [x], ys, sws) == pytest.approx(ref, rel=1e-5)


def test_metrics_per_token_and_iou_equal_keras():
    """Per-token accuracy (masked), weighted accuracy and a confusion-matrix metric,
    updated micro-batch by micro-batch, report Keras's whole-batch values."""
    model = losszoo.causal_lm(mask="zero")
    x, y, pad = losszoo.lm_data(N, seed=4)
    sw = (pad * 1.5).astype("float32")
    metrics = ["accuracy", keras.metrics.MeanIoU(losszoo.VOCAB, sparse_y_pred=False)]
    loss = keras.losses.SparseCategoricalCrossentropy(True)
    model.compile("sgd", loss, metrics=metrics, weighted_metrics=["accuracy"])
    obj = _objective(model, [x], [y])
    for part in np.array_split(np.arange(N), 3):
        obj.update_metrics([0], [tf.constant(y[part])], [model(x[part])], [tf.constant(sw[part])])
    ours = obj.metric_results(obj.metric_state([0]))
    ref = model.evaluate(x, y, sample_weight=sw, batch_size=N, return_dict=True, verbose=0)
    assert set(ours) <= set(ref) and len(ours) == 3
    for k, v in ours.items():
        assert v == pytest.approx(ref[k], rel=1e-6), k


def test_softmax_output_keeps_its_logits():
    model = losszoo.saturated_softmax()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((N, 4)).astype("float32"), rng.integers(0, 5, N)
    ref = _keras(model, [x], y, None)
    clipped = float(keras.losses.SparseCategoricalCrossentropy()(y, tf.identity(model(x))))
    assert abs(clipped - ref) > 1.0, "the case must tell the logits path from the clipped one"
    assert _ours(model, [x], [y], [None]) == pytest.approx(ref, rel=1e-5)


def test_late_stage_output_keeps_keras_logits():
    """The output of a stage after a cut still carries `_keras_logits`, eagerly and traced."""
    from hyparflow.partition import plan

    model = losszoo.saturated_softmax()
    p = plan(model, 2, balance=[1, 2])
    x = tf.constant(np.ones((2, 4), "float32"))
    assert hasattr(p.forward([x])[0], "_keras_logits")
    traced = tf.function(lambda v: tf.constant(hasattr(p.forward([v])[0], "_keras_logits")))
    assert bool(traced(x))


def test_mask_dropped_by_keras_at_run_time_is_not_counted():
    """Keras 3.15 drops at run time, after Add(x, attention(x)), the mask its graph
    propagates: Keras's loss is then unmasked, and ours must be too (the symbolic mask
    alone would mislead)."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((losszoo.SEQ,), dtype="int32")
    e = layers.Embedding(losszoo.VOCAB, 4, mask_zero=True)(ids)
    x = layers.Add()([e, layers.MultiHeadAttention(2, 2)(e, e)])
    model = keras.Model(ids, layers.Dense(losszoo.VOCAB)(x))
    assert get_keras_mask(model.outputs[0]) is not None
    assert get_keras_mask(model(np.ones((1, losszoo.SEQ), "int32"))) is None
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    x, y, _ = losszoo.lm_data(N, seed=5)
    assert _ours(model, [x], [y], [None]) == pytest.approx(_keras(model, [x], y, None), rel=1e-5)


def test_mask_that_depends_on_weights_is_refused():
    keras.utils.set_random_seed(0)
    inp = keras.Input((losszoo.SEQ, 3))
    x = layers.Masking(0.0)(layers.Dense(3, activation="relu")(inp))
    model = keras.Model(inp, layers.Dense(4)(x))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    x = np.random.default_rng(0).standard_normal((N, losszoo.SEQ, 3)).astype("float32")
    y = np.zeros((N, losszoo.SEQ), "int32")
    with pytest.raises(ConfigError, match="depends on weights"):
        _ours(model, [x], [y], [None])
    # reduction="sum" does not divide by a count: fine
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True, reduction="sum"))
    assert _ours(model, [x], [y], [None]) == pytest.approx(_keras(model, [x], y, None), rel=1e-5)


def test_mask_lost_before_the_loss_is_refused():
    """A mask counted on the host but missing where the loss is traced (as when it would
    have to cross a stage boundary) is refused, not silently ignored. Raised while
    tracing, it reaches the caller wrapped by autograph (a StagingError), message kept."""
    model = losszoo.causal_lm(mask="zero")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    x, y, _ = losszoo.lm_data(N)
    obj = _objective(model, [x], [y])
    divisors = tf.constant(obj.divisors([x], [y], [None], np.arange(N)), tf.float32)
    traced = tf.function(lambda v: obj.stage_loss([0], [tf.constant(y)], [tf.identity(model(v))], [None], divisors))
    with pytest.raises(Exception, match="does not reach the stage"):
        traced(tf.constant(x))


def test_metrics_on_a_subset_of_outputs_named_as_keras_logs_them():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,), name="x")
    h = layers.Dense(8, activation="tanh")(inp)
    tok = layers.Dense(5, name="tok")(layers.Reshape((4, 2))(layers.Dense(8)(h)))
    model = keras.Model(inp, [layers.Dense(3, name="cls")(h), tok])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics, weighted = {"tok": ["accuracy", "accuracy"]}, {"tok": ["accuracy"]}
    model.compile("sgd", [loss, loss], metrics=metrics, weighted_metrics=weighted)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, 5)).astype("float32")
    ys = [rng.integers(0, 3, N), rng.integers(0, 5, (N, 4))]
    sw = rng.uniform(0, 2, (N, 4)).astype("float32")
    obj = _objective(model, [x], ys)
    for part in np.array_split(np.arange(N), 3):
        preds = model(x[part])
        obj.update_metrics([0, 1], [tf.constant(y[part]) for y in ys], preds, [None, tf.constant(sw[part])])
    ours = obj.metric_results(obj.metric_state([0, 1]))
    ref = model.evaluate(x, ys, sample_weight=[np.ones(N, "float32"), sw], batch_size=N, return_dict=True, verbose=0)
    assert sorted(ours) == ["tok_accuracy", "tok_accuracy_1", "tok_weighted_accuracy"]
    for k, v in ours.items():
        assert v == pytest.approx(ref[k], rel=1e-6), k
