"""What each rank holds: only its stage's variables.

Every rank builds the whole model, but after planning a rank needs only the variables
of its stage's layers (tied layers included), their gradient accumulators and optimizer
slots. The others are released: their backing tf.Variable is replaced by a placeholder,
so TensorFlow frees the memory, and any later use of one raises `ReleasedVariableError`
naming the fix. A released variable is re-created when a value arrives for it (the
weight gather to rank 0, `gather="all"`, a checkpoint load).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hyparflow import keras_compat
from hyparflow.graph import np_dtype

# Why a variable of another stage is not held here, by the `gather` mode of the fit.
HINTS = {
    "rank0": "hyparflow gathers the trained model on rank 0 (gather='rank0'); read the weights there, or pass "
    "gather='all' to hyparflow.fit to have every rank hold them.",
    "all": "it is re-created when hyparflow.fit gathers the model to every rank (gather='all').",
    "none": "hyparflow.fit(gather='none') keeps each stage's weights on its own ranks; hyparflow.save(model, path) "
    "writes the whole model, and gather='rank0' or 'all' gathers it.",
}


class ReleasedVariableError(AttributeError):
    """A variable this rank released (it belongs to another pipeline stage) was used.
    An AttributeError, so that probing its storage (`hasattr`) finds nothing."""


class _Released:
    """Stands in for a released variable's storage: every use raises the stored message.
    It keeps an identity, by which an optimizer can still be built for the variable."""

    __slots__ = ("message", "_unique_id")

    def __init__(self, message: str):
        self.message = message
        self._unique_id = f"hyparflow-released-{id(self)}"

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
    release(
        [v for v in model.variables if id(v) not in keep], f"{where} keeps only its pipeline stage's weights; {hint}"
    )


# ---- the estimate ------------------------------------------------------------------------
@dataclass
class StageMemory:
    """Estimated bytes one rank of a stage holds while training."""

    weights: int  # the stage's variables (tied layers' on each holding stage)
    accumulators: int  # one per trainable variable; none where the backward runs the optimizer
    gradients: int  # gradients in flight: added into the accumulators as the backward makes them
    optimizer: int  # the optimizer's slots for the stage's trainable variables
    activations: int  # stashed activations of the micro-batches in flight

    @property
    def total(self) -> int:
        return self.weights + self.accumulators + self.gradients + self.optimizer + self.activations


def slots_per_variable(optimizer) -> int:
    """How many variables of its own size `optimizer` keeps per trained variable (Adam 2,
    SGD with momentum 1), counted on a fresh copy built for one tiny variable; 0 without one."""
    import keras

    if optimizer is None:
        return 0
    inner = keras_compat.inner_optimizer(optimizer)
    counts = []
    for variables in ([], [keras.Variable(np.zeros(3, "float32"))]):
        fresh = inner.__class__.from_config(inner.get_config())
        fresh.build(variables)
        counts.append(len(fresh.variables))
    return counts[1] - counts[0]


def in_flight(schedule: str, num_partitions: int, stage: int, num_microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at once: all of them under GPipe,
    at most P - stage under 1F1B."""
    if schedule == "gpipe":
        return num_microbatches
    return min(num_microbatches, num_partitions - stage)


def estimate(
    plan,
    optimizer,
    microbatch_size: int,
    num_microbatches: int = 1,
    schedule: str = "1f1b",
    updates_in_backward: Collection[int] = (),
):
    """Per stage of `plan`, what one of its ranks holds while training (`StageMemory`);
    `updates_in_backward`: the stages whose optimizer runs in their backward, without
    accumulators (`StageCompute.updates_in_backward`)."""
    slots = slots_per_variable(optimizer)
    out = []
    for st in plan.stages:
        trainable = _bytes(st.trainable_variables)
        # Measured: about two variables' gradients are alive beside the accumulators while
        # the compiled backward adds them in, and two temporaries while the optimizer
        # updates one variable after another; about four, gradients and temporaries, when
        # the backward runs the optimizer (as in Keras's own train_step).
        direct = st.index in updates_in_backward
        largest = sorted((_bytes([v]) for v in st.trainable_variables), reverse=True)[: 4 if direct else 2]
        act = sum(c.act_bytes for c in st.calls) + sum(t.bytes_per_sample for t in st.inputs)
        live = in_flight(schedule, plan.num_partitions, st.index, num_microbatches)
        acc = 0 if direct else trainable
        out.append(StageMemory(_bytes(st.variables), acc, sum(largest), slots * trainable,
                               act * microbatch_size * live))  # fmt: skip
    return out


def rank_peak(plan, stages: list[StageMemory], stage: int, holds_model_at_end: bool) -> int:
    """A rank's estimated peak: the whole model as the script built it, its stage while
    training, or (rank 0 after the gather, `holds_model_at_end`) the whole model's weights
    next to its stage's accumulators and optimizer slots."""
    model = _bytes(plan.graph.model.variables)
    mine = stages[stage]
    end = model + mine.accumulators + mine.optimizer if holds_model_at_end else 0
    return max(model, mine.total, end)


def _bytes(variables) -> int:
    return sum(int(np.prod(v.shape)) * np_dtype(v.dtype).itemsize for v in variables)
