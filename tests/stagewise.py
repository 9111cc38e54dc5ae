"""The transparency check: a plan's stages, run one by one and backpropagated stage by
stage exactly as the engine does, equal the whole model (outputs and gradients)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import zoo

import hyparflow as hf


def stagewise(plan: hf.Plan, inputs, seeds, training=False):
    """Run each stage under its own tape, then backpropagate stage by stage from the last,
    passing boundary gradients exactly as the engine does. Returns (outputs, grads by var id),
    a tied variable's gradient being the sum of its stages' gradients."""
    tensors = plan.graph.tensors
    values = {i: tf.constant(x) for i, x in enumerate(inputs)}
    records = []
    for st in plan.stages:
        feeds = {t: tf.identity(values[t]) for t in st.recv}  # bare, as from the network
        feeds.update({i: values[i] for i in st.data_inputs})
        tape = tf.GradientTape()
        with tape:
            watched = [feeds[t] for t in st.recv if tensors[t].is_float]
            tape.watch(watched)
            out = st.forward(feeds, training=training)
        values.update(out)
        records.append((tape, watched, out))
    outputs = [values[t] for t in plan.graph.output_tensors]
    upstream: dict[int, tf.Tensor] = {}
    for t, s in zip(plan.graph.output_tensors, seeds):
        upstream[t] = upstream.get(t, 0) + s
    var_grads = {}
    for st, (tape, watched, out) in reversed(list(zip(plan.stages, records))):
        targets = [(out[t], upstream[t]) for t in out if t in upstream and tensors[t].is_float]
        float_in = [t for t in st.recv if tensors[t].is_float]
        grads = tape.gradient(
            [v for v, _ in targets],
            st.trainable_variables + watched,
            output_gradients=[g for _, g in targets],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        for v, g in zip(st.trainable_variables, grads):
            var_grads[id(v)] = var_grads.get(id(v), 0) + tf.convert_to_tensor(g)
        for t, g in zip(float_in, grads[len(st.trainable_variables) :]):
            upstream[t] = upstream.get(t, 0) + g
    return outputs, var_grads


def check_transparent(model, parts_list, n=5, xs=None, balance="flops", regularization=True) -> dict:
    """Stagewise == whole model (training=False) at each number of stages: outputs and every
    trainable variable's gradient. Returns {parts: (max output error, max gradient error)},
    each relative to the largest reference value. With `regularization`, also checks that the
    stages' losses add up to the model's."""
    xs = zoo.sample_inputs(model, n) if xs is None else xs
    errors = {}
    with tf.GradientTape() as tape:
        ref = keras.tree.flatten(model(xs if len(xs) > 1 else xs[0], training=False))
    seeds = [
        tf.constant(np.random.default_rng(i).standard_normal(r.shape).astype("float32")) for i, r in enumerate(ref)
    ]
    ref_grads = tape.gradient(ref, model.trainable_variables, output_gradients=seeds)
    for parts in parts_list:
        plan = hf.plan(model, parts, balance=balance)
        assert plan.num_partitions == parts
        assert sum(len(s.calls) for s in plan.stages) == len(plan.graph)
        outs, grads = stagewise(plan, xs, seeds)
        for o, r in zip(outs, ref):
            np.testing.assert_allclose(
                o.numpy(), r.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{model.name} P={parts} outputs"
            )
        assert set(grads) == {id(v) for v in model.trainable_variables}, (
            f"{model.name} P={parts}: a variable is in no stage"
        )
        errors[parts] = (
            max(_rel_err(o, r) for o, r in zip(outs, ref)),
            max((_rel_err(grads[id(v)], r) for v, r in zip(model.trainable_variables, ref_grads)), default=0.0),
        )
        for v, r in zip(model.trainable_variables, ref_grads):
            np.testing.assert_allclose(
                tf.convert_to_tensor(grads[id(v)]).numpy(),
                tf.convert_to_tensor(r).numpy(),
                rtol=1e-4,
                atol=1e-5,
                err_msg=f"{model.name} P={parts} grad {v.path}",
            )
    if not regularization:
        return errors
    # every stage's regularization losses add up to the model's (training mode moves BN
    # statistics, so this comes last and restores the weights)
    saved = model.get_weights()
    plan.forward(xs, training=True)
    reg = sum(float(tf.reduce_sum(x)) for st in plan.stages for x in st.losses)
    model(xs if len(xs) > 1 else xs[0], training=True)
    assert reg == pytest.approx(sum(float(tf.reduce_sum(x)) for x in model.losses), rel=1e-5, abs=1e-7)
    model.set_weights(saved)
    return errors


def _rel_err(a, b) -> float:
    a, b = tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy()
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)) if b.size else 0.0
