"""Keras callbacks across ranks: which run where, and what the ranks must agree on.

Callbacks that write files or print run on rank 0 only; the rest run on every rank with
the same reduced logs. Since the two sets differ between ranks, whether anyone needs
the weights on rank 0 at epoch ends, and whether anything besides a progress bar reads
per-batch logs, is decided together (one reduction at the start).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from hyparflow.failures import phase
from hyparflow.keras_compat import is_default
from hyparflow.loop import BatchLogs, world_sum
from hyparflow.session import Session
from hyparflow.timeline import now

RANK0_CALLBACKS = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.CSVLogger,
    keras.callbacks.TensorBoard,
    keras.callbacks.ProgbarLogger,
)
MODES = ("train", "test", "predict")
# Keras callbacks that never read the whole model's weights on a rank that runs them
# (ModelCheckpoint runs on rank 0, which gets the weights gathered before it saves).
WEIGHT_FREE = (
    keras.callbacks.History,
    keras.callbacks.ProgbarLogger,
    keras.callbacks.CSVLogger,
    keras.callbacks.TerminateOnNaN,
    keras.callbacks.ReduceLROnPlateau,
    keras.callbacks.LearningRateScheduler,
    keras.callbacks.ModelCheckpoint,
)
log = logging.getLogger("hyparflow")


def _weight_free(callback) -> bool:
    kind = type(callback)  # exact types: a subclass may read the weights
    if kind is keras.callbacks.EarlyStopping:
        return not callback.restore_best_weights
    if kind is keras.callbacks.TensorBoard:
        return not (callback.histogram_freq or callback.embeddings_freq)
    return kind in WEIGHT_FREE


def release_hint(session: Session, callbacks: Sequence[Any] | None, hint: str, always: bool = False) -> str | None:
    """`hint` (the error a use of a released variable names) when ranks may release other
    stages' variables for this call, else None: some rank has a callback that may read the
    whole model (a user's own, EarlyStopping(restore_best_weights=True), ...), so every rank
    keeps it, as plain Keras would let that callback. `always` (gather='none') releases anyway."""
    readers = sorted({type(cb).__name__ for cb in callbacks or [] if not _weight_free(cb)})
    if always or not world_sum(session, np.array([float(bool(readers))]), "callback agreement", op="max")[0]:
        return hint
    if readers:
        log.warning(
            "rank %d keeps every pipeline stage's weights in this call: callback(s) %s may read the whole model. "
            "Pass gather='none' to hold only the stage (such a callback then cannot read other stages' weights).",
            session.transport.rank,
            ", ".join(readers),
        )
    return None


def has_batch_hooks(callback, mode: str = "train") -> bool:
    """Whether a Keras callback overrides a batch hook of `mode` (Keras marks its defaults)."""
    hooks = [f"on_{mode}_batch_begin", f"on_{mode}_batch_end"] + (
        ["on_batch_begin", "on_batch_end"] if mode == "train" else []
    )
    return any(not is_default(getattr(callback, h)) for h in hooks)


class Callbacks:
    """The rank's callback list for one call (`mode`: train, test or predict), and what
    all ranks agreed on."""

    def __init__(
        self, session: Session, callbacks: Sequence[Any] | None, verbose: int, mode: str, epochs: int, steps: int | None
    ):
        rank = session.transport.rank
        mine = [cb for cb in (callbacks or []) if rank == 0 or not isinstance(cb, RANK0_CALLBACKS)]
        self.list = keras.callbacks.CallbackList(
            mine,
            add_history=mode == "train",
            add_progbar=verbose != 0,
            model=session.model,
            verbose=verbose,
            epochs=epochs,
            steps=steps,
            hyparflow=self._params(session),
        )
        self.history = next((cb for cb in self.list.callbacks if isinstance(cb, keras.callbacks.History)), None)
        bars = [cb for cb in self.list.callbacks if type(cb) is keras.callbacks.ProgbarLogger]  # not subclasses
        others = [cb for cb in self.list.callbacks if cb not in bars]
        self.has_bar = bool(bars)
        local = [any(isinstance(cb, keras.callbacks.ModelCheckpoint) for cb in mine)]
        for m in MODES:
            silent = mode == "train" and m == "test"  # Keras's bar shows no validation batches within fit
            local += [any(has_batch_hooks(cb, m) for cb in others), bool(bars) and not silent]
        agreed = (
            world_sum(session, np.array(local, float), "callback agreement", op="max") if mode != "predict" else local
        )
        self.weights_on_rank0 = bool(agreed[0])
        self.batch_logs: dict[str, str | None] = {
            m: "exact" if agreed[1 + 2 * i] else "lagged" if agreed[2 + 2 * i] else None for i, m in enumerate(MODES)
        }
        self.timeline = session.timeline

    @staticmethod
    def _params(session: Session) -> dict[str, Any]:
        """What callbacks may read as `self.params["hyparflow"]`: the grid position and the
        executor's live timers (seconds of compute, waiting and allreduce)."""
        grid, executor = session.grid, session.executor
        return {"stage": grid.stage, "replica": grid.replica, "timers": executor.timers if executor else {}}

    def call(self, hook: str, *args, label: str = "") -> None:
        """Run `hook` of every callback, labelled for failure messages (and timed on a timeline)."""
        with phase(f"callback {hook}{label}"):
            t0 = now() if self.timeline is not None else 0.0
            getattr(self.list, hook)(*args)
            if self.timeline is not None:
                self.timeline.add(hook, "callback", t0)

    def on_batch(self, mode: str, epoch: int) -> BatchLogs | None:
        """The per-step hook for `loop.run_epoch`, or None when no rank's callback reads
        `mode`'s batches (then no per-step log reduction happens). When only progress bars
        read them, the logs reach the bars a step late and only ranks holding one call it."""
        kind = self.batch_logs[mode]
        if kind is None:
            return None

        def hook(step: int, logs: dict[str, float] | None) -> None:
            """logs=None before the step, the reduced logs after it."""
            where = f" (epoch {epoch}, step {step})"
            if logs is None:
                self.call(f"on_{mode}_batch_begin", step, label=where)
            else:
                self.call(f"on_{mode}_batch_end", step, logs, label=where)

        lagged = kind == "lagged"
        return BatchLogs(hook, lagged=lagged, reads=self.has_bar or not lagged)
