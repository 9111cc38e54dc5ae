"""The communicator grid (replicas x stages) and the raw-buffer transport on it.

Every message on the training path is a contiguous NumPy buffer sent with mpi4py's
upper-case methods as bytes: shapes and dtypes come from the plan, nothing is pickled.
Ranks oversubscribing cores need Open MPI's mpi_yield_when_idle (the launcher sets it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

log = logging.getLogger("hyparflow")

# Seconds a rank may wait on a peer before the stall is logged, and before it aborts the
# job (0: never). Generous by default: a slow first step traces every tf.function.
STALL_WARN_S = float(os.environ.get("HYPARFLOW_STALL_WARN", "300"))
STALL_ABORT_S = float(os.environ.get("HYPARFLOW_STALL_ABORT", "0"))


@dataclass(frozen=True)
class Grid:
    """This rank's place in a `num_replicas x num_partitions` grid of ranks.

    `pipe` joins the stages of one replica (its rank is the stage index), `data` joins
    the replicas of one stage (its rank is the replica index).
    """

    world: Any
    num_partitions: int
    num_replicas: int
    replica: int
    stage: int
    pipe: Any
    data: Any
    ranks: tuple[tuple[int, ...], ...]  # ranks[replica][stage] -> world rank

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    def where(self, rank: int | None = None) -> str:
        """'rank 3 (replica 1, stage 1)' for a world rank (default: this one)."""
        rank = self.rank if rank is None else rank
        for r, row in enumerate(self.ranks):
            if rank in row:
                return f"rank {rank} (replica {r}, stage {row.index(rank)})"
        return f"rank {rank}"


def make_grid(world, assignment: Sequence[tuple[int, int]], num_partitions: int, num_replicas: int) -> Grid:
    """Build the grid from `assignment[rank] = (replica, stage)` (from placement)."""
    rank = world.Get_rank()
    replica, stage = assignment[rank]
    ranks = [[-1] * num_partitions for _ in range(num_replicas)]
    for r, (rep, st) in enumerate(assignment):
        ranks[rep][st] = r
    pipe = world.Split(color=replica, key=stage)
    data = world.Split(color=stage, key=replica)
    return Grid(world, num_partitions, num_replicas, replica, stage, pipe, data, tuple(map(tuple, ranks)))


ALIGN = 64  # TensorFlow adopts host memory without a copy only when 64-byte aligned


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + n].view(dtype).reshape(shape)


def to_numpy(tensor) -> np.ndarray:
    """A host tensor's memory as a read-only NumPy array, without a copy where DLPack can
    (a copy for dtypes NumPy cannot import that way, such as bfloat16)."""
    try:
        return np.from_dlpack(tensor)
    except (TypeError, BufferError, RuntimeError, ValueError):
        return tensor.numpy()


def to_tensor(array: np.ndarray):
    """A NumPy array as a TensorFlow tensor, sharing its memory when it is aligned."""
    import tensorflow as tf

    if array.ctypes.data % ALIGN == 0 and array.flags.c_contiguous and array.dtype.kind in "fiub" and array.dtype.itemsize in (1, 2, 4, 8):
        try:
            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        except (TypeError, BufferError, RuntimeError, ValueError, tf.errors.InvalidArgumentError):
            pass
    return tf.convert_to_tensor(array)


def as_bytes(array: np.ndarray) -> np.ndarray:
    """A zero-copy byte view of a C-contiguous array (any dtype, bfloat16 included)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class Watchdog:
    """One daemon thread per process that notices a wait lasting too long: it logs which
    rank waits for whom and why after HYPARFLOW_STALL_WARN seconds, and aborts the job
    after HYPARFLOW_STALL_ABORT seconds (0: never). Waits themselves stay plain MPI waits."""

    _instance: Watchdog | None = None

    def __init__(self):
        self.current: tuple[float, tuple[str, str]] | None = None  # (start, (who waits, for what)) of the wait in progress
        threading.Thread(target=self._watch, name="hyparflow-watchdog", daemon=True).start()

    @classmethod
    def get(cls) -> Watchdog:
        if cls._instance is None:
            cls._instance = Watchdog()
        return cls._instance

    def _watch(self) -> None:
        warned_for = None
        while True:
            time.sleep(max(min(STALL_WARN_S, STALL_ABORT_S or STALL_WARN_S) / 8, 0.05))
            current = self.current
            if current is None:
                continue
            start, (where, what) = current
            waited = time.monotonic() - start
            if waited > STALL_WARN_S and warned_for is not current:
                warned_for = current
                log.warning("%s has waited %.0f s for %s", where, waited, what)
            if STALL_ABORT_S and waited > STALL_ABORT_S:
                from hyparflow.failures import abort

                abort(f"{where} stalled {waited:.0f} s waiting for {what}")


class Transport:
    """Point-to-point and collective transfers of raw buffers on a grid.

    Waits are MPI's own (no Python polling on the hot path); a watchdog thread reports a
    wait that lasts too long, naming the peer and what was expected from it.
    """

    def __init__(self, grid: Grid):
        self.grid = grid
        self.where = grid.where()
        self.watchdog = Watchdog.get()

    def isend(self, array: np.ndarray, dest: int, tag: int) -> Any:
        """Start sending `array` to stage `dest` of this replica; keep `array` alive until done."""
        return self.grid.pipe.Isend(as_bytes(array), dest=dest, tag=tag)

    def irecv(self, array: np.ndarray, source: int, tag: int) -> Any:
        return self.grid.pipe.Irecv(as_bytes(array), source=source, tag=tag)

    def allreduce_sum(self, comm, send: np.ndarray, recv: np.ndarray, what: str) -> None:
        """Allreduce(SUM) of `send` into `recv`, waited on under the watchdog."""
        if comm.Get_size() == 1:
            recv[...] = send
            return
        self.wait([comm.Iallreduce(send, recv, op=MPI.SUM)], what)

    def wait(self, requests: list, what: str, peer: int | None = None) -> None:
        """Complete `requests`; `peer` is the stage waited on (None: a collective)."""
        if not requests:
            return
        self.watchdog.current = (time.monotonic(), (self.where, f"{self._peer(peer)} ({what})"))
        try:
            MPI.Request.Waitall(requests)
        finally:
            self.watchdog.current = None

    def _peer(self, stage: int | None) -> str:
        if stage is None:
            return "the other ranks in a collective"
        return self.grid.where(self.grid.ranks[self.grid.replica][stage])
