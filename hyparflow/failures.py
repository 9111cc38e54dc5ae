"""Fail fast: an exception on any rank ends the whole job with a message that names
the rank, its place in the grid, the phase and the original traceback.

Errors in validation are raised identically on every rank before any communication,
so they surface as ordinary exceptions. Anything that escapes while ranks talk to each
other is logged and the world is aborted (MPI_Abort), so no peer stays blocked in a
receive or a collective.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator

log = logging.getLogger("hyparflow")


class _State:
    phase = "start-up"
    where = ""  # "rank 3 (replica 1, stage 1)" once the grid exists


state = _State()


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Label what this rank is doing, for failure and stall messages."""
    previous, state.phase = state.phase, name
    yield
    state.phase = previous


def abort(message: str, code: int = 1) -> None:
    """Log `message` on stderr and abort every rank of the job."""
    from mpi4py import MPI

    sys.stderr.write(f"\nhyparflow: {message}\n")
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code)


def _where() -> str:
    if state.where:
        return state.where
    from mpi4py import MPI

    return f"rank {MPI.COMM_WORLD.Get_rank()}"


@contextlib.contextmanager
def distributed() -> Iterator[None]:
    """Run a block in which ranks communicate: any exception aborts the job, by name."""
    from mpi4py import MPI

    try:
        yield
    except BaseException as exc:
        if MPI.COMM_WORLD.Get_size() == 1:
            raise
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        abort(f"{_where()} failed during {state.phase}: {type(exc).__name__}: {exc}\n{tb}")


def install_excepthook() -> None:
    """Abort the job when an uncaught exception ends a rank of a multi-rank job."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1 or getattr(sys.excepthook, "_hyparflow", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        abort(f"{_where()} ended with an uncaught {kind.__name__} during {state.phase}: {value}")

    hook._hyparflow = True  # type: ignore[attr-defined]
    sys.excepthook = hook
