"""An in-process loopback world: P x R ranks as threads of one Python process.

`run(size, fn)` calls `fn(comm)` on `size` threads, each with a `LoopbackComm` that offers
the subset of mpi4py's communicator API that `transport.Transport` uses. Passed as
`hf.fit(..., comm=comm)`, it runs the real engine (stages, schedule, executor, reducer)
without MPI: fast tests of many models, and a reference for the MPI transport.

Messages are copied, matched by (source, tag) in posting order as MPI matches them, and
collectives reduce in rank order, so every member gets bit-identical results. A failure on
any thread fails every wait in the world, so a test never hangs.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from hyparflow.failures import explain

WAIT_TIMEOUT_S = 300.0


class LoopbackAbort(RuntimeError):
    """Raised in a rank thread when the loopback world was aborted."""


class _World:
    def __init__(self, size: int):
        self.size = size
        self.cond = threading.Condition()
        self.messages: dict[tuple, Any] = {}  # (group, src, dst, tag, ordinal) -> bytes
        self.sent: dict[tuple, int] = {}  # (group, src, dst, tag) -> messages sent so far
        self.posted: dict[tuple, int] = {}  # (group, src, dst, tag) -> receives posted so far
        self.slots: dict[tuple, dict[int, Any]] = {}  # (group, collective no.) -> {member: value}
        self.reads: dict[tuple, int] = {}  # (group, collective no.) -> members that have read it
        self.failed: str | None = None

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        """Block until `ready()` (under the lock), the world fails, or the timeout."""
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while not ready():
            if self.failed is not None:
                raise LoopbackAbort(f"loopback world aborted while waiting for {what}: {self.failed}")
            if not self.cond.wait(timeout=min(1.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                raise LoopbackAbort(f"loopback wait for {what} timed out after {WAIT_TIMEOUT_S:.0f} s")

    def fail(self, message: str) -> None:
        with self.cond:
            if self.failed is None:
                self.failed = message
            self.cond.notify_all()


class _Done:
    """A request that completed when it was made."""

    def Wait(self) -> None:
        pass

    def Test(self) -> bool:
        return True


class _Recv:
    def __init__(self, comm: LoopbackComm, buf: np.ndarray, key: tuple):
        self.comm, self.buf, self.key, self.done = comm, buf, key, False

    def Test(self) -> bool:
        world = self.comm.world
        with world.cond:
            if not self.done and self.key in world.messages:
                self.buf[...] = world.messages.pop(self.key)
                self.done = True
            return self.done

    def Wait(self) -> None:
        world = self.comm.world
        with world.cond:
            world.wait_for(lambda: self.done or self.key in world.messages, f"a message {self.key}")
        self.Test()


class _Reduce:
    """An allreduce started by depositing this member's value; it completes, reducing in
    member order, once every member has deposited."""

    def __init__(self, comm: LoopbackComm, key: tuple, recv: np.ndarray, op: Any):
        self.comm, self.key, self.recv, self.op, self.done = comm, key, recv, op, False

    def Test(self) -> bool:
        if not self.done and self.comm._arrived(self.key):
            self.Wait()
        return self.done

    def Wait(self) -> None:
        if self.done:
            return
        values = self.comm._collect(self.key)
        out = values[0].copy()
        for v in values[1:]:
            out = np.maximum(out, v) if _is_max(self.op) else out + v
        self.recv[...] = out
        self.done = True


class LoopbackComm:
    """One rank's view of a group of threads (see the module docstring)."""

    def __init__(self, world: _World, members: tuple[int, ...], me: int, group: tuple = ("world",)):
        self.world, self.members, self.me, self.group = world, members, me, group
        self.collectives = 0  # this member's collective calls so far on this group

    def Get_rank(self) -> int:
        return self.me

    def Get_size(self) -> int:
        return len(self.members)

    # ---- collectives: every member deposits, every member reads all ------------------
    def _deposit(self, value: Any) -> tuple:
        """Put this member's value in the group's next collective; returns its key."""
        world = self.world
        key = (self.group, self.collectives)
        self.collectives += 1
        with world.cond:
            world.slots.setdefault(key, {})[self.me] = value
            world.cond.notify_all()
        return key

    def _arrived(self, key: tuple) -> bool:
        with self.world.cond:
            return len(self.world.slots[key]) >= len(self.members)

    def _collect(self, key: tuple) -> list[Any]:
        """Every member's value of collective `key`, once all have deposited."""
        world = self.world
        with world.cond:
            slot = world.slots[key]
            world.wait_for(lambda: len(slot) >= len(self.members), f"collective {key}")
            values = [slot[i] for i in range(len(self.members))]
            world.reads[key] = world.reads.get(key, 0) + 1
            if world.reads[key] == len(self.members):
                del world.slots[key], world.reads[key]
        return values

    def _exchange(self, value: Any) -> list[Any]:
        return self._collect(self._deposit(value))

    def allgather(self, value: Any) -> list[Any]:
        return self._exchange(value)

    def bcast(self, value: Any, root: int = 0) -> Any:
        return self._exchange(value)[root]

    def gather(self, value: Any, root: int = 0) -> list[Any] | None:
        values = self._exchange(value)
        return values if self.me == root else None

    def allreduce(self, value: Any, op: Any = None) -> Any:
        values = self._exchange(value)
        return max(values) if _is_max(op) else sum(values)

    def Iallreduce(self, send: np.ndarray, recv: np.ndarray, op: Any = None) -> _Reduce:
        return _Reduce(self, self._deposit(np.array(send, copy=True)), recv, op)

    def Ibcast(self, buf: np.ndarray, root: int = 0) -> _Done:
        values = self._exchange(np.array(buf, copy=True) if self.me == root else None)
        if self.me != root:
            buf[...] = values[root]
        return _Done()

    def Split(self, color: int = 0, key: int = 0) -> LoopbackComm | None:
        """As MPI's: members with the same color form a group; MPI.UNDEFINED joins none (None)."""
        from mpi4py import MPI

        rows = self._exchange((color, key, self.members[self.me]))
        if color == MPI.UNDEFINED:
            return None
        mine = sorted((k, world_rank) for c, k, world_rank in rows if c == color)
        members = tuple(r for _, r in mine)
        group = self.group + (f"split{self.collectives}", color)
        return LoopbackComm(self.world, members, members.index(self.members[self.me]), group)

    def Split_type(self, split_type: Any = None, key: int = 0) -> LoopbackComm | None:
        return self.Split(0, key)  # one process: one node

    def Free(self) -> None:
        pass

    # ---- point to point: copies, matched in posting order ------------------------------
    def Isend(self, buf: np.ndarray, dest: int, tag: int = 0) -> _Done:
        world = self.world
        channel = (self.group, self.me, dest, tag)
        with world.cond:
            ordinal = world.sent.get(channel, 0)
            world.sent[channel] = ordinal + 1
            world.messages[channel + (ordinal,)] = np.array(buf, copy=True)
            world.cond.notify_all()
        return _Done()

    def Irecv(self, buf: np.ndarray, source: int, tag: int = 0) -> _Recv:
        world = self.world
        channel = (self.group, source, self.me, tag)
        with world.cond:
            ordinal = world.posted.get(channel, 0)
            world.posted[channel] = ordinal + 1
        return _Recv(self, buf, channel + (ordinal,))

    def Abort(self, code: int = 1) -> None:
        self.world.fail(f"rank {self.members[self.me]} aborted (code {code})")
        raise LoopbackAbort(f"rank {self.members[self.me]} aborted the loopback world")


def _is_max(op: Any) -> bool:
    from mpi4py import MPI

    return op is MPI.MAX


def run(size: int, fn: Callable[[LoopbackComm], Any]) -> list[Any]:
    """Run `fn(comm)` on `size` loopback ranks; returns their results in rank order, or
    raises the first rank's error (naming the rank) after every thread has ended."""
    world = _World(size)
    results: list[Any] = [None] * size
    errors: dict[int, BaseException] = {}

    def target(rank: int) -> None:
        try:
            results[rank] = fn(LoopbackComm(world, tuple(range(size)), rank))
        except BaseException as e:  # reported after join, with the rank
            errors[rank] = e
            world.fail(f"rank {rank}: {explain(e)}")

    threads = [threading.Thread(target=target, args=(r,), name=f"loopback-rank-{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        first = min(errors, key=lambda r: isinstance(errors[r], LoopbackAbort))
        e = errors[first]
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        raise RuntimeError(f"loopback rank {first} failed: {type(e).__name__}: {e}\n{tb}") from e
    return results
