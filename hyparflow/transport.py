"""Transport: the only module that calls MPI.

A `Transport` wraps one communicator (MPI's world, or a `loopback` world of threads in
one process) and gives the engine what it needs: a start-up rendezvous with a bounded
wait, the grid's pipe and data groups and one group per set of stages that hold tied
weights (all freed on `close`), raw-buffer point-to-point
transfers between the stages of a replica, array reductions and broadcasts, and small
control-plane object exchanges. Every wait runs under the stall watchdog.

Messages on the training path are contiguous NumPy buffers sent as bytes: shapes and
dtypes come from the plan, nothing is pickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

log = logging.getLogger("hyparflow")

# Seconds a rank may wait on a peer before the stall is logged, and before it aborts the
# job (0: never). Generous by default: a slow first step traces every tf.function.
STALL_WARN_S = float(os.environ.get("HYPARFLOW_STALL_WARN", "300"))
STALL_ABORT_S = float(os.environ.get("HYPARFLOW_STALL_ABORT", "0"))
# Seconds the ranks of a job may arrive apart at the start of a session.
START_TIMEOUT_S = float(os.environ.get("HYPARFLOW_START_TIMEOUT", "30"))
# World tag of start-up and exit notices, and their values.
CONTROL_TAG = 30_001
EXITING, GO, HERE = 0, 1, 2
STAGE_STATE_TAG = 30_100  # + stage: a stage's variables sent to rank 0
_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


def launched_size() -> int:
    """World size the launcher announced (1 when not launched by an MPI launcher)."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


@dataclass(frozen=True)
class Grid:
    """This rank's place in a `num_replicas x num_partitions` grid of ranks. The rank at
    pipeline position p holds the plan's stages p, p + P, ... (`chunks` of them: several
    under an interleaved schedule)."""

    rank: int
    num_partitions: int
    num_replicas: int
    replica: int
    stage: int  # this rank's pipeline position: its first stage
    ranks: tuple[tuple[int, ...], ...]  # ranks[replica][position] -> world rank
    chunks: int = 1

    @property
    def stages(self) -> tuple[int, ...]:
        return self.stages_at(self.stage)

    def stages_at(self, position: int) -> tuple[int, ...]:
        return tuple(position + k * self.num_partitions for k in range(self.chunks))

    def position(self, stage: int) -> int:
        """The pipeline position holding a stage of the plan."""
        return stage % self.num_partitions

    def holder(self, stage: int, replica: int = 0) -> int:
        """The world rank holding a stage of the plan in a replica."""
        return self.ranks[replica][self.position(stage)]

    def where(self, rank: int | None = None) -> str:
        """'rank 3 (replica 1, stage 1)' for a world rank (default: this one); 'stages 1, 3'
        when it holds several."""
        rank = self.rank if rank is None else rank
        for r, row in enumerate(self.ranks):
            if rank in row:
                held = ", ".join(map(str, self.stages_at(row.index(rank))))
                return f"rank {rank} (replica {r}, stage{'s' if self.chunks > 1 else ''} {held})"
        return f"rank {rank}"


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

    shareable = array.flags.c_contiguous and array.dtype.kind in "fiub" and array.dtype.itemsize in (1, 2, 4, 8)
    if shareable and array.ctypes.data % ALIGN == 0:
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
        self.waits: dict[int, tuple[float, str, str, Transport]] = {}  # thread -> wait in progress
        threading.Thread(target=self._watch, name="hyparflow-watchdog", daemon=True).start()

    @classmethod
    def get(cls) -> Watchdog:
        if cls._instance is None:
            cls._instance = Watchdog()
        return cls._instance

    def _watch(self) -> None:
        warned: set[tuple] = set()
        while True:
            time.sleep(max(min(STALL_WARN_S, STALL_ABORT_S or STALL_WARN_S) / 8, 0.05))
            for start, where, what, transport in list(self.waits.values()):
                waited = time.monotonic() - start
                if waited > STALL_WARN_S and (start, where) not in warned:
                    warned.add((start, where))
                    log.warning("%s has waited %.0f s for %s", where, waited, what)
                if STALL_ABORT_S and waited > STALL_ABORT_S:
                    transport.abort(f"{where} stalled {waited:.0f} s waiting for {what}")


class Transport:
    """Transfers between the ranks of one job (see the module docstring).

    `comm` is an mpi4py communicator (default: the world) or a loopback communicator,
    which offers the same methods; the engine never sees either.
    """

    def __init__(self, comm=None):
        self.world = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.grid: Grid | None = None
        self.pipe: Any = None
        self.data: Any = None
        self.tied: dict[tuple[int, ...], Any] = {}  # stage set -> group of its ranks (this rank's sets only)
        self.watchdog = Watchdog.get()
        self.where = f"rank {self.rank}"
        self.timeline: Any = None  # a hyparflow.timeline.Timeline while one records: it receives every wait

    @property
    def is_mpi(self) -> bool:
        return isinstance(self.world, MPI.Comm)

    # ---- start-up and shutdown -------------------------------------------------------
    def rendezvous(self, what: str, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every rank reached `what`. Rank 0 announces its own arrival at once,
        then waits at most `timeout` seconds for the others and names those missing; the
        others wait `timeout` for rank 0's arrival and, once it is there, for its verdict
        (so a missing rank is named by rank 0, not blamed on it). A rank that announces it is
        exiting instead ends the job at once, by name."""
        if self.size == 1:
            return
        deadline = time.monotonic() + timeout
        hint = "(HYPARFLOW_START_TIMEOUT); every rank must make the same hyparflow calls."
        if self.rank == 0:
            here = [self.world.Isend(np.full(1, HERE, np.int64), dest=r, tag=CONTROL_TAG) for r in range(1, self.size)]
            notes = {r: np.zeros(1, np.int64) for r in range(1, self.size)}
            pending = {r: self.world.Irecv(notes[r], source=r, tag=CONTROL_TAG) for r in notes}
            while pending:
                for r in [r for r, req in pending.items() if req.Test()]:
                    del pending[r]
                    if notes[r][0] == EXITING:
                        self.abort(f"rank {r} ended its script without reaching {what}, which the other ranks reached.")
                if pending and time.monotonic() > deadline:
                    self.abort(f"ranks {sorted(pending)} did not reach {what} within {timeout:.0f} s of rank 0 {hint}")
                time.sleep(0.002)
            go = [self.world.Isend(np.full(1, GO, np.int64), dest=r, tag=CONTROL_TAG) for r in range(1, self.size)]
            self.wait(here + go, f"start of {what}")
            return
        self.world.Isend(np.full(1, GO, np.int64), dest=0, tag=CONTROL_TAG).Wait()
        note = np.zeros(1, np.int64)
        for expected in (HERE, GO):
            req = self.world.Irecv(note, source=0, tag=CONTROL_TAG)
            while not req.Test():
                if time.monotonic() > deadline:
                    self.abort(f"rank 0 did not reach {what} within {timeout:.0f} s of rank {self.rank} {hint}")
                time.sleep(0.002)
            if note[0] == EXITING:
                self.abort(f"rank 0 ended its script without reaching {what}, which rank {self.rank} reached.")
            # Rank 0 is here: it names any missing rank after `timeout`; wait a little longer.
            deadline = time.monotonic() + timeout + 30.0 if expected == HERE else deadline

    def announce_exit(self) -> None:
        """Tell the ranks that may be waiting in a rendezvous that this rank is ending."""
        if self.size == 1 or not self.is_mpi or MPI.Is_finalized():
            return
        note = np.full(1, EXITING, np.int64)
        peers = range(1, self.size) if self.rank == 0 else [0]
        requests = [self.world.Isend(note, dest=r, tag=CONTROL_TAG) for r in peers]
        deadline = time.monotonic() + 0.5  # small messages complete at once; never hang an exit
        while not MPI.Request.Testall(requests) and time.monotonic() < deadline:
            time.sleep(0.005)

    def form_grid(
        self,
        assignment: Sequence[tuple[int, int]],
        num_partitions: int,
        num_replicas: int,
        tied_sets: Sequence[tuple[int, ...]] = (),
        chunks: int = 1,
    ) -> Grid:
        """Split the world into the grid's groups from `assignment[rank] = (replica,
        position)`: `pipe` joins the positions of one replica, `data` the replicas of one
        position, and each of `tied_sets` (stage sets holding tied weights, the same list on
        every rank) joins every replica of those stages' positions; a rank keeps the groups
        of the sets one of its `chunks` stages is in."""
        replica, stage = assignment[self.rank]
        grid = Grid(self.rank, num_partitions, num_replicas, replica, stage, (), chunks)
        mine = set(grid.stages)
        ranks = [[-1] * num_partitions for _ in range(num_replicas)]
        for r, (rep, st) in enumerate(assignment):
            ranks[rep][st] = r
        self.close()
        self.pipe = self.world.Split(color=replica, key=stage)
        self.data = self.world.Split(color=stage, key=replica)
        for stages in sorted(set(map(tuple, tied_sets))):  # one order on every rank: Split is collective
            group = self.world.Split(color=0 if mine & set(stages) else MPI.UNDEFINED, key=self.rank)
            if mine & set(stages):
                self.tied[stages] = group
        self.grid = Grid(self.rank, num_partitions, num_replicas, replica, stage, tuple(map(tuple, ranks)), chunks)
        self.where = self.grid.where()
        return self.grid

    def close(self) -> None:
        """Free the grid's groups (a session's communicators must not outlive it)."""
        for comm in (self.pipe, self.data, *self.tied.values()):
            if comm is not None:
                comm.Free()
        self.pipe = self.data = None
        self.tied = {}

    def node_layout(self) -> tuple[int, str, int, int]:
        """(lowest world rank on this node, host name, local rank, ranks on this node)."""
        node = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            leader = node.allreduce(self.rank if node.Get_rank() == 0 else -1, op=MPI.MAX)
            return leader, socket.gethostname(), node.Get_rank(), node.Get_size()
        finally:
            node.Free()

    def abort(self, message: str, code: int = 1) -> None:
        """Report `message` and end every rank of the job."""
        from hyparflow.failures import report

        report(message)
        self.world.Abort(code)

    # ---- control plane: small Python objects --------------------------------------
    def allgather(self, value: Any) -> list[Any]:
        return self.world.allgather(value)

    def bcast(self, value: Any, root: int = 0) -> Any:
        return self.world.bcast(value, root=root)

    def gather(self, value: Any, root: int = 0) -> list[Any] | None:
        return self.world.gather(value, root=root)

    # ---- data plane: raw buffers -------------------------------------------------------
    def _group(self, group: str | tuple[int, ...]):
        """A group by name ("world", "pipe", "data"), or the tied group of a stage set."""
        if isinstance(group, tuple):
            return self.tied[group]
        return {"world": self.world, "pipe": self.pipe, "data": self.data}[group]

    def group_size(self, group: str | tuple[int, ...]) -> int:
        return self._group(group).Get_size()

    def allgather_objects(self, value: Any, what: str, group: str | tuple[int, ...]) -> list[Any]:
        """`value` (pickled: arrays of any size) from every rank of `group`, in rank order."""
        comm = self._group(group)
        if comm.Get_size() == 1:
            return [value]
        with self._watched(f"the other ranks in a collective ({what})"):
            return comm.allgather(value)

    def isend(self, array: np.ndarray, stage: int, tag: int) -> Any:
        """Start sending `array` to `stage` of this replica; keep `array` alive until done."""
        return self.pipe.Isend(as_bytes(array), dest=stage, tag=tag)

    def irecv(self, array: np.ndarray, stage: int, tag: int) -> Any:
        return self.pipe.Irecv(as_bytes(array), source=stage, tag=tag)

    def allreduce(
        self, send: np.ndarray, recv: np.ndarray, what: str, group: str | tuple[int, ...] = "world", op: str = "sum"
    ) -> None:
        """Reduce `send` over `group` (a name or a tied stage set) into `recv`, waited on
        under the watchdog."""
        comm = self._group(group)
        if comm.Get_size() == 1:
            recv[...] = send
            return
        self.wait([comm.Iallreduce(send, recv, op=_OPS[op])], what)

    def iallreduce(self, send: np.ndarray, recv: np.ndarray, group: str = "world") -> list:
        """Start summing `send` over `group` into `recv`; complete the returned requests with
        `wait` (none when the group is this rank alone: `recv` is filled at once)."""
        comm = self._group(group)
        if comm.Get_size() == 1:
            recv[...] = send
            return []
        return [comm.Iallreduce(send, recv, op=MPI.SUM)]

    def progress(self, requests: list) -> None:
        """Let started requests advance (MPI moves nonblocking collectives only inside MPI
        calls); completed ones become null requests, which `wait` skips."""
        if requests and self.is_mpi:
            MPI.Request.Testall(requests)

    def bcast_array(self, buffer: np.ndarray, root: int, what: str) -> None:
        """Broadcast `buffer` from world rank `root` (in place)."""
        if self.size > 1:
            self.wait([self.world.Ibcast(as_bytes(buffer), root=root)], what)

    def send_array(self, array: np.ndarray, dest: int, tag: int, what: str) -> None:
        self.wait([self.world.Isend(as_bytes(array), dest=dest, tag=tag)], what, rank=dest)

    def recv_array(self, array: np.ndarray, source: int, tag: int, what: str) -> None:
        self.wait([self.world.Irecv(as_bytes(array), source=source, tag=tag)], what, rank=source)

    def wait(self, requests: list, what: str, stage: int | None = None, rank: int | None = None) -> None:
        """Complete `requests`: from `stage` of this replica, world `rank`, or a collective."""
        if not requests:
            return
        if stage is not None and self.grid is not None:
            rank = self.grid.ranks[self.grid.replica][stage]
        peer = "the other ranks in a collective" if rank is None else self._name(rank)
        timeline = self.timeline
        t0 = time.perf_counter() if timeline is not None else 0.0
        with self._watched(f"{peer} ({what})"):
            if self.is_mpi:
                MPI.Request.Waitall(requests)
            else:
                for req in requests:
                    req.Wait()
        if timeline is not None:
            timeline.add(
                f"wait for rank {rank}" if rank is not None else f"wait: {what}",
                "wait",
                t0,
                args={"for": what, "peer": rank},
            )

    @contextlib.contextmanager
    def _watched(self, waiting_for: str) -> Iterator[None]:
        """A blocking wait the watchdog times (see `Watchdog`)."""
        key = threading.get_ident()
        self.watchdog.waits[key] = (time.monotonic(), self.where, waiting_for, self)
        try:
            yield
        finally:
            self.watchdog.waits.pop(key, None)

    def _name(self, rank: int) -> str:
        return self.grid.where(rank) if self.grid is not None else f"rank {rank}"
