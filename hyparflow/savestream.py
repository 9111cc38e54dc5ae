"""Writing the whole model's `.keras` file while each stage's state stays on its ranks.

World rank 0 writes the file with Keras's own `model.save`, but the values it does not
hold (the optimizer slots of other stages' variables, and after `gather="none"` their
weights) are stand-ins that ask the stage's replica-0 rank for one variable at a time as
Keras writes it: rank 0 never holds more than one foreign variable at once, and the full
optimizer it saves is built without allocating its slots.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from hyparflow import keras_compat, memory
from hyparflow.checkpoint import _keyed, save_model
from hyparflow.failures import explain
from hyparflow.graph import np_dtype

REQUEST_TAG = 30_060  # world tag of rank 0's requests; the answers come on REQUEST_TAG + 1
REQUEST_BYTES = 1024


class _Remote:
    """Stands in for a variable's storage on the writer: reading it fetches the value."""

    def __init__(self, fetch):
        self.fetch = fetch
        self._unique_id = f"hyparflow-remote-{id(self)}"

    def numpy(self) -> np.ndarray:
        return self.fetch()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        value = self.fetch()
        return value if dtype is None else value.astype(dtype)


def _encode(request: Any) -> np.ndarray:
    data = json.dumps(request).encode()
    if len(data) > REQUEST_BYTES:
        raise ValueError(f"checkpoint request too long: {request!r}")
    buf = np.zeros(REQUEST_BYTES, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    return buf


def _decode(buf: np.ndarray) -> Any:
    return json.loads(bytes(buf).rstrip(b"\0").decode())


def write(session, path: str) -> None:
    """Collective over the session's ranks: rank 0 writes `path` (atomically); the stages'
    replica-0 ranks answer its requests. Any failure is raised on every rank."""
    t, grid = session.transport, session.grid
    holders = sorted(set(grid.ranks[0]) - {0})
    error = None
    if t.rank == 0:
        try:
            _write(session, path)
        except Exception as e:  # reported on every rank below
            error = explain(e)
        finally:
            for h in holders:
                t.send_array(_encode(None), h, REQUEST_TAG, "the end of checkpoint writing")
    elif t.rank in holders:
        _serve(session)
    error = t.bcast(error, root=0)
    if error:
        raise RuntimeError(f"checkpoint {path} could not be written by rank 0: {error}")


def _serve(session) -> None:
    """Answer rank 0's requests for this stage's values until it says it is done."""
    t, model = session.transport, session.model
    slots = dict(_keyed(model.optimizer, model))
    while True:
        buf = np.empty(REQUEST_BYTES, np.uint8)
        t.recv_array(buf, 0, REQUEST_TAG, "checkpoint requests from rank 0")
        request = _decode(buf)
        if request is None:
            return
        kind, key, shape, dtype = request
        var = model.variables[key] if kind == "model" else slots.get(tuple(key))
        value = np.zeros(shape, dtype) if var is None else np.ascontiguousarray(var.numpy(), dtype)
        t.send_array(value, 0, REQUEST_TAG + 1, "checkpoint values to rank 0")


def _write(session, path: str) -> None:
    t, grid, plan, model = session.transport, session.grid, session.plan, session.model
    owner: dict[int, int] = {}
    for s, st in enumerate(plan.stages):
        for v in st.variables:
            owner.setdefault(id(v), grid.holder(s))

    def remote(kind: str, key: Any, var, rank: int) -> _Remote:
        shape, dtype = [int(d) for d in var.shape], np_dtype(var.dtype)
        if rank == 0:  # no stage holds it (an optimizer never built there): as a fresh one would
            return _Remote(lambda: np.zeros(shape, dtype))

        def fetch() -> np.ndarray:
            t.send_array(_encode([kind, key, shape, dtype.name]), rank, REQUEST_TAG, "a checkpoint request")
            value = np.empty(shape, dtype)
            t.recv_array(value, rank, REQUEST_TAG + 1, f"checkpoint value {key}")
            return value

        return _Remote(fetch)

    swapped: list[tuple[Any, Any]] = []  # (variable, its own storage), put back afterwards
    for i, v in enumerate(model.variables):
        if memory.is_released(v):
            swapped.append((v, keras_compat.variable_storage(v)))
            keras_compat.set_variable_storage(v, remote("model", i, v, owner[id(v)]))
    own = model.optimizer
    if own is not None and getattr(own, "built", False):
        full = own.__class__.from_config(own.get_config())
        keras_compat.build_unallocated(full, model.trainable_variables)
        local = dict(_keyed(own, model))
        trainable = model.trainable_variables
        last = grid.holder(len(plan.stages) - 1)
        for key, var in _keyed(full, model):
            if key in local:
                keras_compat.set_variable_storage(var, keras_compat.variable_storage(local[key]))
            else:
                rank = owner.get(id(trainable[key[0]]), 0) if isinstance(key[0], int) else last
                keras_compat.set_variable_storage(var, remote("slot", list(key), var, rank))
        model.optimizer = full
    try:
        save_model(model, path)
    finally:
        model.optimizer = own
        for v, storage in swapped:
            keras_compat.set_variable_storage(v, storage)
