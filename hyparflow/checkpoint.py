"""Moving and saving model state: weights packed into one raw byte buffer per transfer
(broadcast at start, gathered from the stages at the end), and checkpoints written
atomically so a crash never leaves a corrupt file behind."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from hyparflow.comm import Grid
from hyparflow.partition import Plan


def _np_dtype(v) -> np.dtype:
    return np.dtype(tf.as_dtype(v.dtype).as_numpy_dtype)


def nbytes(variables: Sequence[Any]) -> int:
    return sum(int(np.prod(v.shape)) * _np_dtype(v).itemsize for v in variables)


def pack(variables: Sequence[Any]) -> np.ndarray:
    """All values in one uint8 buffer (any dtypes), in the given order."""
    if not variables:
        return np.zeros(0, np.uint8)
    return np.concatenate([np.ascontiguousarray(v.numpy()).reshape(-1).view(np.uint8) for v in variables])


def unpack(buffer: np.ndarray, variables: Sequence[Any]) -> None:
    offset = 0
    for v in variables:
        dt = _np_dtype(v)
        n = int(np.prod(v.shape)) * dt.itemsize
        v.assign(buffer[offset:offset + n].view(dt).reshape(v.shape))
        offset += n


def broadcast_variables(comm, variables: Sequence[Any], root: int = 0) -> None:
    """Make `variables` on every rank of `comm` equal to those on `root` (one Bcast)."""
    if comm.Get_size() == 1:
        return
    buf = pack(variables) if comm.Get_rank() == root else np.empty(nbytes(variables), np.uint8)
    comm.Bcast(buf, root=root)
    if comm.Get_rank() != root:
        unpack(buf, variables)


def gather_stages(plan: Plan, grid: Grid, to_all: bool = False) -> None:
    """Copy each stage's variables from its replica-0 rank to world rank 0 (or to all)."""
    world, me = grid.world, grid.rank
    for s, stage in enumerate(plan.stages):
        root = grid.ranks[0][s]
        variables = stage.variables
        if to_all:
            broadcast_variables(world, variables, root)
        elif root != 0:
            if me == root:
                world.Send(pack(variables), dest=0, tag=7000 + s)
            elif me == 0:
                buf = np.empty(nbytes(variables), np.uint8)
                world.Recv(buf, source=root, tag=7000 + s)
                unpack(buf, variables)


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
