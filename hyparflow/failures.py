"""Fail fast: an exception on any rank ends the whole job with a message that names
the rank, its place in the grid, the phase and the original traceback.

Errors in validation are raised identically on every rank before any communication,
so they surface as ordinary exceptions. Anything that escapes while ranks talk to each
other is reported and the world is aborted, so no peer stays blocked in a receive or a
collective. `install()` (run by `import hyparflow` in a multi-rank job, as
`python -m mpi4py` does) extends this to the user's whole script: an uncaught exception
on any rank aborts the job, and a rank that ends normally tells the others, so a peer
waiting for it at a session's start fails at once instead of hanging.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any


class _State(threading.local):
    """What this rank (a thread, in a loopback world) is doing, for messages."""

    phase = "start-up"
    where = ""  # "rank 3 (replica 1, stage 1)" once the grid exists


state = _State()


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Label what this rank is doing, for failure and stall messages. An exception leaves
    the label in place: it names where the failure happened."""
    previous, state.phase = state.phase, name
    yield
    state.phase = previous


def explain(error: BaseException) -> str:
    """'Type: message', with the error it was raised while handling, if any: a cleanup
    that fails after an earlier error (say, MemoryError) otherwise hides that error."""
    text = f"{type(error).__name__}: {error}"
    earlier = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return text if earlier is None else f"{text} (raised after {explain(earlier)})"


def report(message: str) -> None:
    """Write a failure message on stderr."""
    sys.stderr.write(f"\nhyparflow: {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def distributed(transport: Any) -> Iterator[None]:
    """Run a block in which ranks communicate: any exception aborts the job, by name."""
    try:
        yield
    except BaseException as exc:
        if transport.size == 1:
            raise
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        where = state.where or transport.where
        transport.abort(f"{where} failed during {state.phase}: {type(exc).__name__}: {exc}\n{tb}")
        raise


def install() -> None:
    """In a multi-rank MPI job: abort the job on an uncaught exception on any rank, and
    announce a normal exit to ranks that may wait for this one. Idempotent."""
    from hyparflow.transport import Transport, launched_size

    if launched_size() <= 1 or getattr(sys.excepthook, "_hyparflow", False):
        return
    world = Transport()
    if world.size == 1:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        where = state.where or world.where
        world.abort(f"{where} ended with an uncaught {kind.__name__} during {state.phase}: {value}")

    hook._hyparflow = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    atexit.register(world.announce_exit)
