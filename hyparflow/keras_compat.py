"""Every access to Keras internals (and TensorFlow's), in one place.

hyparflow needs a few things Keras 3 does not export: the nodes of a functional graph,
the user's compile() arguments, Keras's own loss/metric resolution and reduction
helpers, implicit masks, per-layer loss lists, and which nested models simply run
their functional graph (so that the graph can be expanded in place); and of TensorFlow,
an order between ops of a graph already made, and no retracing warning for functions
traced once by design. A Keras release that moves `keras.src`
breaks only this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src import ops, tree
from keras.src.backend import get_keras_mask, set_keras_mask
from keras.src.losses.loss import apply_mask, reduce_weighted_values, squeeze_or_expand_to_same_rank
from keras.src.trainers.compile_utils import get_loss, get_metric
from keras.src.utils.python_utils import is_default

__all__ = [
    "apply_mask",
    "call_context_args",
    "compile_identity",
    "compiled_loss",
    "compiled_metrics",
    "functional_graph",
    "get_keras_mask",
    "get_loss",
    "get_metric",
    "data_adapter",
    "inputs_structure",
    "is_array_like",
    "is_default",
    "loss_elements",
    "nodes_by_depth",
    "overridden_steps",
    "own_call_losses",
    "plain_functional",
    "reduce_weighted_values",
    "regularization_losses",
    "run_after",
    "traced_once",
    "one_update_at_a_time",
    "set_keras_mask",
    "squeeze_or_expand_to_same_rank",
    "unpack_x_y_sample_weight",
    "optimizer_variables_for",
    "variable_storage",
    "set_variable_storage",
    "materialize",
    "build_unallocated",
]


def functional_graph(model) -> Any | None:
    """The functional model behind `model` (itself, or a built Sequential's), else None."""
    import keras

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None) if model.built else None
    if hasattr(model, "_nodes_by_depth") and getattr(model, "outputs", None):
        return model
    return None


def plain_functional(layer) -> Any | None:
    """The functional graph of `layer` if calling it just runs that graph, else None.

    True for functional models (keras_hub backbones and tasks included) and built
    Sequential models that do not override call(); a subclass with its own call() may
    compute something else than its graph, so it must be treated as one opaque layer.
    """
    import keras
    from keras.src.models.functional import Functional

    if isinstance(layer, keras.Sequential):
        return functional_graph(layer) if type(layer).call is keras.Sequential.call else None
    if isinstance(layer, Functional) and type(layer).call is Functional.call:
        return layer
    return None


def inputs_structure(fn) -> Any:
    """The nested structure (tensor, list or dict) a functional model's inputs were given in."""
    return fn._inputs_struct


def nodes_by_depth(fn) -> dict[int, list[Any]]:
    """{depth: [Node]} of a functional model (depth 0: the output nodes)."""
    return fn._nodes_by_depth


def call_context_args(layer) -> tuple[str, ...]:
    """Call arguments Keras fills from context (e.g. 'training') for this layer."""
    return tuple(getattr(layer, "_call_context_args", ()))


def compiled_loss(model) -> tuple[Any, Any] | None:
    """(loss, loss_weights) as the user passed them to compile(), or None if not compiled."""
    cl = getattr(model, "_compile_loss", None)
    return None if cl is None else (cl._user_loss, cl._user_loss_weights)


def is_array_like(data) -> bool:
    """Whether Keras would slice `data` (arrays, tensors, DataFrames, nested lists/dicts of them)."""
    from keras.src.trainers.data_adapters import array_data_adapter

    return array_data_adapter.can_convert_arrays(data)


def data_adapter(x, steps: int | None, class_weight) -> Any:
    """Keras's own adapter for a stream (tf.data.Dataset, PyDataset, generator)."""
    from keras.src.trainers.data_adapters import get_data_adapter

    return get_data_adapter(x, steps_per_epoch=steps, class_weight=class_weight)


def unpack_x_y_sample_weight(element) -> tuple[Any, Any, Any]:
    """A stream element as (x, y, sample_weight), as Keras reads it."""
    from keras.src.trainers.data_adapters.data_adapter_utils import unpack_x_y_sample_weight as unpack

    return unpack(element)


def compile_identity(model) -> tuple[int, ...]:
    """Identifies the model's current compile() call: a recompiled model gets new objects."""
    return tuple(id(getattr(model, a, None)) for a in ("optimizer", "_compile_loss", "_compile_metrics"))


def overridden_steps(model, names: tuple[str, ...]) -> list[str]:
    """Which of Keras's training hooks (train_step, compute_loss, ...) the model's class overrides."""
    import keras

    return [n for n in names if getattr(type(model), n, None) is not getattr(keras.Model, n, None)]


def compiled_metrics(model) -> tuple[Any, Any] | None:
    """(metrics, weighted_metrics) as the user passed them to compile(), or None."""
    cm = getattr(model, "_compile_metrics", None)
    return None if cm is None else (cm._user_metrics, cm._user_weighted_metrics)


def regularization_losses(layer) -> list[Any]:
    """Weight-regularizer losses of a layer and its sublayers (they depend on weights only)."""
    return layer._get_regularization_losses()


def own_call_losses(layer) -> list[Any]:
    """Losses added during the last call of a layer and its sublayers (activity
    regularizers, add_loss in call)."""
    return [loss for sub in layer._flatten_layers() for loss in sub._get_own_losses()]


def run_after(gate, ops) -> None:
    """Make the graph's `ops` wait for op `gate`: TensorFlow exports no way to order ops
    that are already made (tf.function's automatic control dependencies do it so)."""
    for op in ops:
        op._add_control_input(gate)


def traced_once(fn) -> Any:
    """`tf.function(fn)`, without TensorFlow's warning that calls "triggered tf.function
    retracing": it counts traces by Python code object, so one closure made per timed
    piece of a model (each traced once, on purpose) reads to it as a function retraced."""
    compiled = tf.function(fn)
    compiled._omit_frequent_tracing_warning = True
    return compiled


def optimizer_variables_for(optimizer) -> list[Any]:
    """The model variables a built optimizer was built for."""
    return list(optimizer._trainable_variables)


def variable_storage(variable) -> Any:
    """What backs a Keras variable's value (a tf.Variable on TensorFlow)."""
    return variable._value


def set_variable_storage(variable, storage) -> None:
    """Replace what backs a Keras variable; the old backing memory is freed once unreferenced."""
    variable._value = storage


def materialize(variable, value) -> None:
    """Back `variable` with a new tf.Variable holding `value` (as Keras creates one)."""
    variable._value = None
    variable._initialize(value)


def build_unallocated(optimizer, variables) -> None:
    """Build `optimizer` for `variables` without allocating its slots: Keras defers the
    creation of variables made in a stateless scope, and these are never initialized
    (their storage is set by the caller)."""
    from keras.src.backend.common import global_state
    from keras.src.backend.common.stateless_scope import StatelessScope

    pending = list(global_state.get_global_attribute("uninitialized_variables", []) or [])
    with StatelessScope(initialize_variables=False):
        optimizer.build(list(variables))
    global_state.set_global_attribute("uninitialized_variables", pending)


@contextlib.contextmanager
def weights_written_through_disk() -> Iterator[None]:
    """Make `model.save` write the weights to a file beside the target, not into memory:
    Keras buffers the whole weights file in memory when the machine's free memory looks
    large enough, which defeats streaming them one variable at a time."""
    from keras.src.saving import saving_lib

    enough = getattr(saving_lib, "is_memory_sufficient", None)
    if enough is None:  # a Keras that always buffers: nothing to turn off
        yield
        return
    saving_lib.is_memory_sufficient = lambda model: False
    try:
        yield
    finally:
        saving_lib.is_memory_sufficient = enough


def loss_elements(loss, y_true, y_pred, sample_weight) -> tuple[Any, Any]:
    """What `Loss.__call__` computes before it reduces: the loss values times the sample
    weight and the mask (as 0/1), broadcast as Keras broadcasts them, and the mask it
    used (the prediction's `_keras_mask` and-ed with one the loss sets on its values,
    e.g. `ignore_class`), or None.

    Mirrors Keras 3.15's `Loss.__call__` line by line up to `reduce_weighted_values`,
    which is called with reduction "none" so that the caller can divide the sum by a
    global count. The conversion is Keras's own, so a softmax/sigmoid prediction keeps
    its `_keras_logits` and crossentropy still works from the logits behind it.
    """
    in_mask = get_keras_mask(y_pred)
    with ops.name_scope(loss.name):
        y_pred = tree.map_structure(lambda x: ops.convert_to_tensor(x, dtype=loss.dtype), y_pred)
        y_true = tree.map_structure(lambda x: ops.convert_to_tensor(x, dtype=loss.dtype), y_true)
        values = loss.call(y_true, y_pred)
        out_mask = get_keras_mask(values)
        if in_mask is not None and out_mask is not None:
            mask = in_mask & out_mask
        else:
            mask = in_mask if in_mask is not None else out_mask
        weighted = reduce_weighted_values(values, sample_weight, mask, reduction="none", dtype=loss.dtype)
    return weighted, mask


def inner_optimizer(optimizer):
    """The optimizer that updates the variables: a LossScaleOptimizer's wrapped one, else itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


@contextlib.contextmanager
def one_update_at_a_time(optimizer) -> Iterator[None]:
    """While an optimizer step is traced, start each variable's update after the previous
    one's last write: TensorFlow would run the independent updates side by side, with every
    variable's temporaries alive at once. Relies on Keras calling `update_step` per variable."""
    import tensorflow as tf

    inner = inner_optimizer(optimizer)
    update = inner.update_step
    last: list[Any] = []

    def chained(gradient, variable, learning_rate):
        with tf.control_dependencies(last):
            gradient = tf.identity(gradient)
        update(gradient, variable, learning_rate)
        last[:] = [tf.identity(variable)]

    object.__setattr__(inner, "update_step", chained)
    try:
        yield
    finally:
        object.__delattr__(inner, "update_step")


def global_clipnorm(optimizer) -> float | None:
    """The norm `optimizer` clips all gradients to, taken together (`global_clipnorm`), if set."""
    clip = getattr(inner_optimizer(optimizer), "global_clipnorm", None)
    return float(clip) if clip else None


@contextlib.contextmanager
def clipped_outside(optimizer) -> Iterator[None]:
    """While an optimizer step is traced, take its gradients as clipped already: by the
    whole model's global norm, which the optimizer of one stage cannot see."""
    inner = inner_optimizer(optimizer)
    object.__setattr__(inner, "_clip_gradients", lambda grads: grads)
    try:
        yield
    finally:
        object.__delattr__(inner, "_clip_gradients")


def sparse_rows_matter(optimizer) -> bool:
    """Whether `optimizer` updates a variable otherwise from a sparse gradient (rows with
    repeated indices, as Keras hands over an embedding's: one per token occurrence) than
    from those rows summed: any clipping does, and so does Adam's second moment, which
    squares each row. Probed on a fresh copy of the optimizer."""
    inner = inner_optimizer(optimizer)
    if any(getattr(inner, kind, None) for kind in ("clipnorm", "global_clipnorm", "clipvalue")):
        return True
    updated = []
    try:
        for sparse in (True, False):
            probe = inner.__class__.from_config(inner.get_config())
            v = keras.Variable(np.zeros((2, 1), np.float32))
            g = tf.IndexedSlices(tf.constant([[1.0], [3.0]]), tf.constant([0, 0]), tf.constant([2, 1]))
            probe.apply([g if sparse else tf.convert_to_tensor(g)], [v])
            updated.append(v.numpy())
    except Exception:  # an optimizer that cannot be copied or probed: the rows are always right
        return True
    return not np.allclose(updated[0], updated[1], rtol=1e-5, atol=0)
