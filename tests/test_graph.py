"""Any Keras graph: plain ops, nested models (expanded in place), layers tied across
stages, and Keras masks crossing stage boundaries. One process, no MPI."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import zoo
from stagewise import check_transparent

import hyparflow as hf
from hyparflow import partition
from hyparflow.graph import ModelGraph


def all_parts(model) -> list[int]:
    return list(range(2, len(ModelGraph(model)) + 1))


def cut_after(model, kind) -> list[int]:
    """Layer-call counts of two stages, the first ending with the first call of a `kind` layer."""
    calls = ModelGraph(model).calls
    first = next(c.index for c in calls if isinstance(c.layer, kind)) + 1
    return [first, len(calls) - first]


def test_ops_are_calls_without_weights():
    graph = ModelGraph(zoo.ops_graph())
    ops = [c for c in graph.calls if not isinstance(c.layer, keras.layers.Layer)]
    kinds = {type(c.layer).__name__ for c in ops}
    assert {"Add", "Multiply", "Mean", "Concatenate", "Tanh", "Sigmoid", "Subtract"} <= kinds
    for c in ops:
        assert c.param_bytes == 0
        assert c.flops == sum(graph.tensors[o].bytes_per_sample for o in c.outputs) / 4
    assert len(graph.fingerprint) == 16


def test_nested_models_are_expanded_and_left_untouched():
    model = zoo.nested_deep()
    before = (model.to_json(), [len(layer._inbound_nodes) for layer in model._flatten_layers()], model.get_weights())
    plan = hf.plan(model, 4, balance="time")  # "time" runs every call in training mode
    calls = plan.graph.calls
    kinds = {(c.name.rsplit("/", 1)[0], type(c.layer).__name__) for c in calls}
    want = {
        ("middle/block", "BatchNormalization"),
        ("block#1", "BatchNormalization"),
        ("seq", "Dropout"),
        ("middle", "Add"),
    }
    assert want <= kinds
    assert [(c.name.split("/")[0], c.context) for c in calls if c.context] == [("block#1", {"training": False})] * 3
    after = (model.to_json(), [len(layer._inbound_nodes) for layer in model._flatten_layers()], model.get_weights())
    assert after[:2] == before[:2]
    for a, b in zip(after[2], before[2]):
        np.testing.assert_array_equal(a, b)
    assert "middle/block/" in str(plan)


def test_nested_model_called_twice_ties_its_layers():
    model = zoo.nested_deep()
    block = model.get_layer("middle").get_layer("block")
    split = [p for p in all_parts(model) if len(hf.plan(model, p, balance="flops").tied)]
    assert split
    plan = hf.plan(model, split[0], balance="flops")
    assert {id(v) for v, _ in plan.tied} == {id(v) for v in block.variables}
    assert "tied layers" in str(plan)


def test_subclassed_nested_model_stays_one_call():
    class Inner(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = keras.layers.Dense(4), keras.layers.Dense(4)

        def call(self, x):
            return self.b(self.a(x))

    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(Inner()(keras.layers.Dense(4)(inp))))
    assert [type(c.layer).__name__ for c in ModelGraph(model).calls] == ["Dense", "Inner", "Dense"]
    check_transparent(model, [2, 3])


def test_top_level_model_overriding_call_is_refused():
    class Custom(keras.Model):
        def call(self, x):
            return super().call(x) * 2.0

    inp = keras.Input((3,))
    model = Custom(inp, keras.layers.Dense(2)(inp))
    with pytest.raises(hf.ConfigError, match="overrides call\\(\\).*num_partitions=1"):
        hf.plan(model, 2)


def transfer_model(base):
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(base(inp, training=False))
    return keras.Model(inp, keras.layers.Dense(5, name="head")(x), name="transfer")


def test_transfer_learning_splits_and_balances_the_base():
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    model = transfer_model(base)
    total = sum(int(np.prod(v.shape)) for v in model.weights) * 4
    for parts in (2, 4):
        plan = hf.plan(model, parts, balance="params")
        holding_base = {s.index for s in plan.stages for c in s.calls if c.name.startswith(f"{base.name}/")}
        assert holding_base == set(range(parts)), str(plan)
        assert max(s.param_bytes for s in plan.stages) <= 1.5 * total / parts, str(plan)
    check_transparent(model, [2, 4], n=2, balance="params", regularization=False)


def test_the_training_flag_reaches_a_nested_base_as_in_keras():
    """Keras 3's functional models pass the outer call's `training` to every layer, over an
    explicit `base(x, training=False)` and over the `training=False` Keras records for a
    plain Dropout call; the stages must do the same."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    model = transfer_model(base)
    xs = zoo.sample_inputs(model, 4)
    before = model.get_weights()
    want = model(xs[0], training=True).numpy()
    moved = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(moved, before)), "Keras moved the base's BatchNorm statistics"
    for parts in (2, 4):
        model.set_weights(before)
        out = hf.plan(model, parts, balance="flops").forward(xs, training=True)[0]
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-5)
        for a, b in zip(model.get_weights(), moved):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_masks_cross_every_cut():
    model = zoo.masked_seq()
    xs = zoo.padded_tokens(model, 6)
    assert (xs[0] == 0).any()
    parts = all_parts(model)
    check_transparent(model, parts, xs=xs)
    plans = [hf.plan(model, p, balance="flops") for p in parts]
    assert all(any(plan.graph.tensors[t].mask_of >= 0 for t in plan.boundary) for plan in plans)


def test_without_the_mask_a_receiving_stage_differs(monkeypatch):
    """The check above can fail: a stage that drops the received mask computes something else."""
    model = zoo.masked_seq()
    xs = zoo.padded_tokens(model, 6)
    want = model(xs[0], training=False).numpy()
    plan = hf.plan(model, 2, balance=cut_after(model, keras.layers.LSTM))
    assert any(plan.graph.tensors[t].mask_of >= 0 for t in plan.boundary)
    np.testing.assert_allclose(plan.forward(xs)[0].numpy(), want, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(partition.keras_compat, "set_keras_mask", lambda x, mask: None)
    assert np.abs(plan.forward(xs)[0].numpy() - want).max() > 0.05 * np.abs(want).max()


def test_tied_embedding_language_model():
    model = zoo.tied_lm()
    xs = zoo.padded_tokens(model, 4)
    emb = model.get_layer("tied_embedding")
    for parts in all_parts(model):
        plan = hf.plan(model, parts, balance="flops")
        assert [(id(v), s) for v, s in plan.tied] == [(id(emb.embeddings), [0, parts - 1])], str(plan)
    check_transparent(model, all_parts(model), xs=xs)


def test_keras_hub_task_nested_in_a_model():
    model = zoo.hub_causal_lm()
    names = [c.name for c in ModelGraph(model).calls]
    assert any(n.startswith("gpt2_causal_lm/gpt2_backbone/transformer_layer_") for n in names)
    plan = hf.plan(model, 3, balance="flops")
    assert plan.tied and all(s == [0, 2] for _, s in plan.tied)
    check_transparent(model, all_parts(model), xs=zoo.padded_tokens(model, 4))


def test_keras_hub_backbone_nested_with_a_head():
    model = zoo.bert_with_head()
    ids, mask = zoo.padded_tokens(model, 4)
    assert len(ModelGraph(model)) > 10  # the backbone's layers are planned one by one
    check_transparent(model, all_parts(model), xs=[ids, np.zeros_like(ids), mask])


def test_keras_hub_task_at_the_top_level_needs_fixed_lengths():
    model = zoo.hub_causal_lm().layers[-1]
    with pytest.raises(hf.ConfigError, match="unknown dimensions"):
        hf.plan(model, 2, balance="flops")
