"""Every access to Keras internals, in one place.

hyparflow needs a few things Keras 3 does not export: the nodes of a functional graph,
the user's compile() arguments, Keras's own loss/metric resolution and reduction
helpers, implicit masks, and per-layer loss lists. A Keras release that moves
`keras.src` breaks only this module.
"""

from __future__ import annotations

from typing import Any

from keras.src import ops, tree
from keras.src.backend import get_keras_mask, set_keras_mask
from keras.src.losses.loss import apply_mask, reduce_weighted_values, squeeze_or_expand_to_same_rank
from keras.src.trainers.compile_utils import get_loss, get_metric
from keras.src.utils.python_utils import is_default

__all__ = [
    "apply_mask",
    "call_context_args",
    "compiled_loss",
    "compiled_metrics",
    "functional_graph",
    "get_keras_mask",
    "get_loss",
    "get_metric",
    "is_default",
    "loss_elements",
    "nodes_by_depth",
    "own_call_losses",
    "reduce_weighted_values",
    "regularization_losses",
    "set_keras_mask",
    "squeeze_or_expand_to_same_rank",
    "optimizer_variables_for",
]


def functional_graph(model) -> Any | None:
    """The functional model behind `model` (itself, or a built Sequential's), else None."""
    import keras

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None) if model.built else None
    if hasattr(model, "_nodes_by_depth") and getattr(model, "outputs", None):
        return model
    return None


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


def optimizer_variables_for(optimizer) -> list[Any]:
    """The model variables a built optimizer was built for."""
    return list(optimizer._trainable_variables)


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
