"""The communicator grid (replicas x stages) and the raw-buffer transport on it.

Every message on the training path is a contiguous NumPy buffer sent with mpi4py's
upper-case methods as bytes: shapes and dtypes come from the plan, nothing is pickled.
Waits poll with a short back-off so ranks oversubscribing cores yield to their peers,
and report a stall (which peer, doing what) when one lasts too long.
"""

from __future__ import annotations

import logging
import os
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


def as_bytes(array: np.ndarray) -> np.ndarray:
    """A zero-copy byte view of a C-contiguous array (any dtype, bfloat16 included)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class Transport:
    """Point-to-point and collective transfers of raw buffers on a grid.

    Waits poll with an exponential back-off (up to 1 ms) instead of spinning, so
    ranks that oversubscribe cores leave them to their peers, and log a stall (which
    peer, doing what) when one lasts longer than HYPARFLOW_STALL_WARN seconds.
    """

    def __init__(self, grid: Grid):
        self.grid = grid

    def isend(self, array: np.ndarray, dest: int, tag: int) -> Any:
        """Start sending `array` to stage `dest` of this replica; keep `array` alive until done."""
        return self.grid.pipe.Isend(as_bytes(array), dest=dest, tag=tag)

    def irecv(self, array: np.ndarray, source: int, tag: int) -> Any:
        return self.grid.pipe.Irecv(as_bytes(array), source=source, tag=tag)

    def allreduce_sum(self, comm, send: np.ndarray, recv: np.ndarray, what: str) -> None:
        """Allreduce(SUM) of `send` into `recv`, waited on with the stall watchdog."""
        if comm.Get_size() == 1:
            recv[...] = send
            return
        self.wait([comm.Iallreduce(send, recv, op=MPI.SUM)], what)

    def wait(self, requests: list, what: str, peer: int | None = None) -> None:
        """Complete `requests`; `peer` is the stage waited on (None: a collective)."""
        if not requests or MPI.Request.Testall(requests):
            return
        start = time.monotonic()
        warned = False
        pause = 2e-6
        while not MPI.Request.Testall(requests):
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
            waited = time.monotonic() - start
            if not warned and waited > STALL_WARN_S:
                warned = True
                log.warning("%s has waited %.0f s for %s (%s)", self.grid.where(), waited, self._peer(peer), what)
            if STALL_ABORT_S and waited > STALL_ABORT_S:
                from hyparflow.failures import abort

                abort(f"{self.grid.where()} stalled {waited:.0f} s waiting for {self._peer(peer)} ({what})")

    def _peer(self, stage: int | None) -> str:
        if stage is None:
            return "the other ranks in a collective"
        return self.grid.where(self.grid.ranks[self.grid.replica][stage])
