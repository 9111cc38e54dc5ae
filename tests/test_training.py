"""Training any Keras graph equals plain Keras `fit` (2 SGD steps, every weight within 1e-4
relative) through the loopback engine, in float64 so that Keras's own noise floor (the
same batches with their rows reordered) stays far below the tolerance: weights tied across
stages (a transformer LM whose logits reuse its input embedding; keras_hub backbones nested
in a model), transfer learning on a nested application base, Keras masks crossing a cut,
plain ops on every side of a cut. Every tied variable's copies are checked bit-identical on every rank holding them."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import zoo
from training import train_like_keras

from hyparflow.graph import ModelGraph

TOLERANCE = 1e-4
pytestmark = pytest.mark.usefixtures("float64")


def compiled(model, lr=0.1, **optimizer_kw):
    optimizer = keras.optimizers.SGD(lr, **optimizer_kw)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def pooled(model):
    """The model's per-token logits averaged over the sequence: one class per sample.
    (Per-token losses are another change's; the tied path stays in the graph.)"""
    return keras.Model(model.inputs, keras.layers.GlobalAveragePooling1D()(model.outputs[0]), name=model.name)


def check(result, tied: int | None = None):
    print(result)
    assert result.moved > 1e-3, f"training did not change the weights: {result}"
    assert result.floor < 1e-9 and result.err < TOLERANCE, result
    if tied is not None:
        assert result.tied == tied, result


def tokens(model, n=16):
    ids, mask = zoo.padded_tokens(model, n)
    return [ids, mask], np.random.default_rng(1).integers(0, 3, n)


@pytest.mark.parametrize("grid", [(4, 1, 1), (2, 2, 2)], ids=["P4", "P2xR2xM2"])
def test_tied_embedding_lm(grid):
    build = lambda: compiled(pooled(zoo.tied_lm()))  # noqa: E731
    x, y = tokens(build())
    result = train_like_keras(build, x, y, *grid)
    check(result, tied=1)
    assert result.err < 1e-9, "float64 gradients must be summed over replicas and stages in float64"


def test_keras_hub_causal_lm_ties_its_token_embedding():
    build = lambda: compiled(pooled(zoo.hub_causal_lm()))  # noqa: E731
    x, y = tokens(build())
    check(train_like_keras(build, x, y, 4))


def test_global_clipnorm_clips_by_the_whole_models_norm_and_keeps_tied_copies_identical():
    """The causal LM's token embedding is held by two stages; its gradient counts once in
    the norm, and both copies take bit-identical clipped updates."""
    build = lambda: compiled(pooled(zoo.hub_causal_lm()), global_clipnorm=0.05)  # noqa: E731
    x, y = tokens(build())
    check(train_like_keras(build, x, y, 4), tied=1)


@pytest.mark.parametrize("clip", [{}, {"global_clipnorm": 0.05}, {"clipnorm": 0.05}], ids=["", "global", "clipnorm"])
def test_keras_hub_backbone_nested_with_a_head(clip):
    """With clipping too: Keras measures the sparse gradient of BERT's embeddings over its
    rows, one per token, which the summed gradient does not show."""

    def build():
        return compiled(zoo.bert_with_head(dropout=0.0), **clip)

    (ids, mask), y = tokens(build())
    check(train_like_keras(build, [ids, np.zeros_like(ids), mask], y, 4))


@pytest.mark.parametrize("parts", [2, 4])
def test_transfer_learning_on_a_nested_base(parts):
    def build():
        keras.utils.set_random_seed(0)
        base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
        inp = keras.Input((32, 32, 3), name="image")
        x = keras.layers.GlobalAveragePooling2D()(base(inp, training=False))
        return compiled(keras.Model(inp, keras.layers.Dense(5, name="head")(x)), lr=0.01)

    x = np.random.default_rng(0).standard_normal((16, 32, 32, 3))
    check(train_like_keras(build, x, np.random.default_rng(1).integers(0, 5, 16), parts))


@pytest.mark.parametrize("cut", ["after the embedding", "flops P4"])
def test_masks_across_a_cut(cut):
    build = lambda: compiled(zoo.masked_seq())  # noqa: E731
    model = build()
    calls = ModelGraph(model).calls
    first = next(c.index for c in calls if isinstance(c.layer, keras.layers.Embedding)) + 1
    parts, balance = (2, [first, len(calls) - first]) if cut == "after the embedding" else (4, "flops")
    ids = zoo.padded_tokens(model, 16)[0]
    assert (ids == 0).any()
    check(train_like_keras(build, ids, np.random.default_rng(1).integers(0, 3, 16), parts, balance=balance))


def test_ops_on_every_side_of_a_cut():
    build = lambda: compiled(zoo.ops_graph())  # noqa: E731
    model = build()
    x, y = zoo.sample_inputs(model, 16), zoo.sample_targets(model, 16)[0]
    for counts in ([3, len(ModelGraph(model)) - 3], [6, len(ModelGraph(model)) - 6]):
        calls = ModelGraph(model).calls
        assert not isinstance(calls[counts[0] - 1].layer, keras.layers.Layer) or not isinstance(
            calls[counts[0]].layer, keras.layers.Layer
        )
        check(train_like_keras(build, x, y, 2, balance=counts))
    check(train_like_keras(build, x, y, 4))
