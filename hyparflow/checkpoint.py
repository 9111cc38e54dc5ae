"""Moving and saving model state: weights packed into one raw byte buffer per transfer
(broadcast at start, gathered from the stages at the end), checkpoints written
atomically so a crash never leaves a corrupt file behind, and the resume decision
taken once, by rank 0, for every rank."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from hyparflow import keras_compat, memory
from hyparflow.errors import ConfigError
from hyparflow.failures import explain
from hyparflow.graph import np_dtype
from hyparflow.partition import Plan
from hyparflow.transport import STAGE_STATE_TAG, Transport

CHUNK_BYTES = 16 << 20  # the most a weight transfer packs at once (unless one variable is larger)


def nbytes(variables: Sequence[Any]) -> int:
    return sum(int(np.prod(v.shape)) * np_dtype(v.dtype).itemsize for v in variables)


def pack(variables: Sequence[Any]) -> np.ndarray:
    """All values in one uint8 buffer (any dtypes), in the given order."""
    if not variables:
        return np.zeros(0, np.uint8)
    if len(variables) == 1:  # no concatenated copy
        return np.ascontiguousarray(variables[0].numpy()).reshape(-1).view(np.uint8)
    return np.concatenate([np.ascontiguousarray(v.numpy()).reshape(-1).view(np.uint8) for v in variables])


def unpack(buffer: np.ndarray, variables: Sequence[Any]) -> None:
    """Assign the values `pack` put in `buffer` (re-creating released variables)."""
    offset = 0
    for v in variables:
        dt = np_dtype(v.dtype)
        n = int(np.prod(v.shape)) * dt.itemsize
        memory.set_value(v, buffer[offset : offset + n].view(dt).reshape(v.shape))
        offset += n


def chunks(variables: Sequence[Any], limit: int = CHUNK_BYTES) -> list[list[Any]]:
    """Consecutive runs of `variables` of at most `limit` bytes (a larger variable alone),
    so that moving them never packs more than that, or one variable, at once."""
    out: list[list[Any]] = []
    size = limit
    for v in variables:
        n = nbytes([v])
        if size + n > limit:
            out.append([])
            size = 0
        out[-1].append(v)
        size += n
    return out


def broadcast_variables(transport: Transport, variables: Sequence[Any], root: int = 0) -> None:
    """Make `variables` on every rank equal to those on world rank `root` (one broadcast)."""
    if transport.size == 1:
        return
    for part in chunks(variables):
        buf = pack(part) if transport.rank == root else np.empty(nbytes(part), np.uint8)
        transport.bcast_array(buf, root, "weight broadcast")
        if transport.rank != root:
            unpack(buf, part)


def _send(transport: Transport, variables: Sequence[Any], dest: int, tag: int, what: str) -> None:
    for part in chunks(variables):
        transport.send_array(pack(part), dest, tag, what)


def _recv(transport: Transport, variables: Sequence[Any], source: int, tag: int, what: str) -> None:
    parts = chunks(variables)
    space = np.empty(max((nbytes(p) for p in parts), default=0), np.uint8)  # one buffer for every chunk
    for part in parts:
        buf = space[: nbytes(part)]
        transport.recv_array(buf, source, tag, what)
        unpack(buf, part)


def gather_stages(plan: Plan, transport: Transport, to_all: bool = False) -> None:
    """Copy each stage's variables from its replica-0 rank to world rank 0 (or to all)."""
    grid, me = transport.grid, transport.rank
    assert grid is not None, "gather_stages needs the session's grid"
    for s, stage in enumerate(plan.stages):
        root = grid.holder(s)
        variables = stage.variables
        if to_all:
            broadcast_variables(transport, variables, root)
        elif root != 0 and me == root:
            _send(transport, variables, 0, STAGE_STATE_TAG + s, f"stage {s} weights to rank 0")
        elif root != 0 and me == 0:
            _recv(transport, variables, root, STAGE_STATE_TAG + s, f"stage {s} weights")


def scatter_stages(plan: Plan, transport: Transport, hint: str | None, release_root: bool) -> None:
    """Give every rank its stage's variables from world rank 0, a chunk at a time. With a
    `hint` (the error a later use names), release the variables of other stages on every
    rank but rank 0 (on rank 0 too with `release_root`): no rank ever holds the whole model
    twice. Variables outside every stage's layers are broadcast to all; without a `hint`,
    every variable is (ranks that released some in an earlier call hold them again)."""
    grid, me = transport.grid, transport.rank
    assert grid is not None, "scatter_stages needs the session's grid"
    if hint is None:
        broadcast_variables(transport, plan.graph.model.variables, 0)
        return
    if me != 0:
        release_other_stages(plan, transport, hint)
    staged = {id(v) for st in plan.stages for v in st.variables}
    broadcast_variables(transport, [v for v in plan.graph.model.variables if id(v) not in staged], 0)
    for s, stage in enumerate(plan.stages):
        holders = sorted({grid.holder(s, r) for r in range(grid.num_replicas)} - {0})
        if me == 0:
            for dest in holders:
                _send(transport, stage.variables, dest, STAGE_STATE_TAG + s, f"stage {s} weights from rank 0")
        elif me in holders:
            _recv(transport, stage.variables, 0, STAGE_STATE_TAG + s, f"stage {s} weights")
    if me == 0 and release_root:
        release_other_stages(plan, transport, hint)


def release_other_stages(plan: Plan, transport: Transport, hint: str) -> None:
    """Free this rank's copies of the variables of other stages (see `hyparflow.memory`)."""
    grid = transport.grid
    assert grid is not None, "release_other_stages needs the session's grid"
    memory.release_other_stages(plan.graph.model, plan.held(grid.stages).variables, grid.where(), hint)


def atomic_write(path: str, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see old or new, never half."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model, path: str) -> None:
    """`model.save(path)`, atomically, its weights written through a file beside `path`:
    never the whole weights file in memory (see `keras_compat.weights_written_through_disk`)."""
    with keras_compat.weights_written_through_disk():
        atomic_write(path, model.save)


# ---- optimizer state, independent of the layout ---------------------------------------
def _keyed(optimizer, model) -> list[tuple[tuple, Any]]:
    """Optimizer variables keyed by (model trainable-variable index, slot name), or
    ("optimizer", name) for the rest (iterations, learning rate): the same keys whatever
    subset of the model the optimizer was built for. Keras names a slot
    f"{variable.path with '/' -> '_'}_{slot}"; the longest matching prefix wins."""
    if optimizer is None or not getattr(optimizer, "built", False):
        return []
    prefixes = sorted(
        ((v.path.replace("/", "_"), i) for i, v in enumerate(model.trainable_variables)), key=lambda p: -len(p[0])
    )
    out = []
    for var in optimizer.variables:
        key: tuple = ("optimizer", var.name)
        for prefix, i in prefixes:
            if var.name.startswith(prefix + "_"):
                key = (i, var.name[len(prefix) + 1 :])
                break
        out.append((key, var))
    return out


def optimizer_state(optimizer, model) -> dict[tuple, np.ndarray]:
    """The optimizer's state as {key: array} (see `_keyed`)."""
    return {key: var.numpy() for key, var in _keyed(optimizer, model)}


def restore_optimizer_state(optimizer, model, variables: Sequence[Any], state: dict[tuple, np.ndarray]) -> int:
    """Build `optimizer` for `variables` (a subset of the model's) if needed and load the
    matching entries of `state`. Returns how many optimizer variables were restored."""
    if not getattr(optimizer, "built", False):
        optimizer.build(list(variables))
    restored = 0
    for key, var in _keyed(optimizer, model):
        if key in state and tuple(state[key].shape) == tuple(var.shape):
            var.assign(state[key])
            restored += 1
    return restored


# ---- whole-model checkpoints ---------------------------------------------------------
def save(model, path: str, comm=None) -> None:
    """Write one standard `.keras` file of the whole model, optimizer state included.

    Collective: world rank 0 writes the file atomically; after a hyparflow call, each
    stage's replica-0 rank streams what rank 0 does not hold (other stages' optimizer
    slots; with `gather="none"` their weights) one variable at a time as Keras writes it
    (`hyparflow.savestream`). Loadable with `keras.models.load_model` and resumable under
    any layout.
    """
    from hyparflow.session import _SESSIONS

    cached = _SESSIONS.get(model)
    write_checkpoint(model, path, cached[1].transport if cached is not None else Transport(comm))


def write_checkpoint(model, path: str, transport: Transport) -> None:
    """`save` on an existing transport (see there)."""
    from hyparflow import savestream
    from hyparflow.session import _SESSIONS

    if not str(path).endswith(".keras"):
        raise ConfigError(f"checkpoint path {path} must end in .keras")
    cached = _SESSIONS.get(model)
    if cached is not None and cached[1].transport is transport:
        savestream.write(cached[1], path)
        return
    states = transport.gather(optimizer_state(model.optimizer, model), root=0)
    error = None
    if transport.rank == 0:
        try:
            merged = {k: v for s in states or [] for k, v in s.items()}
            _write(model, path, merged)
        except Exception as e:  # reported on every rank below
            error = explain(e)
    error = transport.bcast(error, root=0)
    if error:
        raise RuntimeError(f"checkpoint {path} could not be written by rank 0: {error}")


def _write(model, path: str, state: dict) -> None:
    own = model.optimizer
    full = None
    if state and own is not None:
        full = own.__class__.from_config(own.get_config())
        restore_optimizer_state(full, model, model.trainable_variables, state)
        model.optimizer = full
    try:
        save_model(model, path)
    finally:
        if full is not None:
            model.optimizer = own


def load(model, path: str) -> dict[tuple, np.ndarray]:
    """Load a checkpoint's weights into `model`; returns its optimizer state (see
    `optimizer_state`) for `restore_optimizer_state`. Missing, truncated or foreign
    files raise ConfigError."""
    import keras

    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path} does not exist.")
    try:
        loaded = keras.saving.load_model(path, safe_mode=True)
    except Exception as e:
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated or not a Keras model "
            "file."
        ) from None
    theirs, ours = loaded.get_weights(), model.get_weights()
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
        raise ConfigError(
            f"checkpoint {path} holds model '{loaded.name}' with {len(theirs)} weights, which does not match "
            f"model '{model.name}' with {len(ours)} weights: it was written for another model."
        )
    model.set_weights(theirs)
    return optimizer_state(loaded.optimizer, loaded)


CKPT_PATTERN = "epoch-{epoch:05d}.keras"


def checkpoints(folder: str) -> list[tuple[int, str]]:
    """(epoch, path) of the checkpoints in `folder`, newest first."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        if name.startswith("epoch-") and name.endswith(".keras") and name[6:-6].isdigit():
            found.append((int(name[6:-6]), os.path.join(folder, name)))
    return sorted(found, reverse=True)


def latest(model, folder: str) -> tuple[int, dict] | None:
    """Load the newest checkpoint in `folder` that reads back; (epoch, optimizer state)."""
    import logging

    for epoch, path in checkpoints(folder):
        try:
            return epoch, load(model, path)
        except ConfigError as e:
            logging.getLogger("hyparflow").warning("skipping checkpoint: %s", e)
    return None


def resume(model, transport: Transport, resume_from: str | None, folder: str | None) -> tuple[int | None, dict | None]:
    """Decided once for all ranks: rank 0 loads `resume_from`, else the newest readable
    checkpoint in `folder`, and tells the others (epoch, optimizer state); its weights
    reach them with the start-up broadcast. A file rank 0 cannot read fails every rank."""
    if resume_from is None and folder is None:
        return None, None
    found: Any = None
    if transport.rank == 0:
        try:
            found = (None, load(model, resume_from)) if resume_from is not None else latest(model, folder or "")
        except ConfigError as e:
            found = e
    found = transport.bcast(found, root=0)
    if isinstance(found, ConfigError):
        raise ConfigError(f"rank 0 cannot resume: {found}")
    return found if found is not None else (None, None)


def prune(folder: str, keep: int) -> None:
    for _, path in checkpoints(folder)[keep:]:
        os.unlink(path)
