"""What each rank holds: only its stage's variables.

Every rank builds the whole model, but after planning a rank needs only the variables
of its stage's layers (tied layers included), their gradient accumulators and optimizer
slots. The others are released: their backing tf.Variable is replaced by a placeholder,
so TensorFlow frees the memory, and any later use of one raises `ReleasedVariableError`
naming the fix. A released variable is re-created when a value arrives for it (the
weight gather to rank 0, `gather="all"`, a checkpoint load).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from hyparflow import keras_compat
from hyparflow.graph import np_dtype


class ReleasedVariableError(RuntimeError):
    """A variable this rank released (it belongs to another pipeline stage) was used."""


class _Released:
    """Stands in for a released variable's storage: every use raises the stored message."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message

    def __getattr__(self, name: str) -> Any:
        raise ReleasedVariableError(self.message)

    def __array__(self, *args, **kwargs) -> Any:
        raise ReleasedVariableError(self.message)

    def __repr__(self) -> str:
        return "<released by hyparflow>"


def is_released(variable) -> bool:
    return isinstance(keras_compat.variable_storage(variable), _Released)


def release(variables: Iterable[Any], why: str) -> None:
    """Free the storage of `variables`; `why` (with the variable's path) is the error a later use raises."""
    for v in variables:
        if not is_released(v):
            keras_compat.set_variable_storage(v, _Released(f"variable '{v.path}' is not held here: {why}"))


def set_value(variable, value: np.ndarray) -> None:
    """Assign `value`, re-creating the storage of a released variable."""
    if is_released(variable):
        keras_compat.materialize(variable, np.array(value, copy=True))
    else:
        variable.assign(value)


def restore_zeros(model) -> None:
    """Re-create every released variable of `model` (zeros), before the model is planned
    again under a new layout; the start-up broadcast then fills them."""
    for v in model.variables:
        if is_released(v):
            keras_compat.materialize(v, np.zeros(tuple(v.shape), np_dtype(v.dtype)))


def release_other_stages(model, stage_variables: Iterable[Any], where: str, hint: str) -> None:
    """Release every variable of `model` not in `stage_variables`."""
    keep = {id(v) for v in stage_variables}
    release([v for v in model.variables if id(v) not in keep], f"{where} keeps only its pipeline stage's weights; {hint}")
