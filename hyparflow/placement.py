"""Placement: which node each rank is on, which (replica, stage) it plays, and how many
threads it may use.

The default policy ("pipeline") fills nodes with whole replicas: ranks sorted by
(node, local rank) take stages 0..P-1 of replica 0, then of replica 1, and so on, so a
replica's stages share a node whenever P divides the ranks on it (activations cross
stage boundaries every micro-batch; the gradient allreduce crosses nodes once a step).
"replica" puts the replicas of a stage next to each other instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hyparflow.errors import ConfigError

log = logging.getLogger("hyparflow")
POLICIES = ("pipeline", "replica")

_LOCAL_SIZE_VARS = (
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "MV2_COMM_WORLD_LOCAL_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "PMI_LOCAL_SIZE",
)
_LOCAL_RANK_VARS = (
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID",
    "PMI_LOCAL_RANK",
)


@dataclass(frozen=True)
class Slot:
    """Where one rank runs."""

    rank: int
    node: int  # index of its node, in order of first appearance
    host: str
    local_rank: int
    cores: tuple[int, ...]  # cores it may use (empty: not bound)


def check_grid(size: int, num_partitions: int, num_replicas: int, policy: str = "pipeline") -> None:
    """The job's `size` ranks must be the grid, and the policy one we know."""
    if policy not in POLICIES:
        raise ConfigError(f"placement policy {policy!r}: expected one of {POLICIES}.")
    if size != num_partitions * num_replicas:
        raise ConfigError(
            f"The job has {size} ranks but num_partitions x num_replicas = {num_partitions} x {num_replicas} = "
            f"{num_partitions * num_replicas}; launch with -np {num_partitions * num_replicas} or change the grid."
        )


def assign(
    slots: Sequence[Slot], num_partitions: int, num_replicas: int, policy: str = "pipeline"
) -> list[tuple[int, int]]:
    """(replica, stage) for each rank. Pure: testable with synthetic node layouts."""
    check_grid(len(slots), num_partitions, num_replicas, policy)
    order = sorted(slots, key=lambda s: (s.node, s.local_rank, s.rank))
    out: list[tuple[int, int]] = [(0, 0)] * len(slots)
    for i, s in enumerate(order):
        if policy == "pipeline":
            out[s.rank] = (i // num_partitions, i % num_partitions)
        else:
            out[s.rank] = (i % num_replicas, i // num_replicas)
    return out


def split_cores(num_cores: int, local_size: int, local_rank: int) -> tuple[int, ...]:
    """A disjoint, contiguous share of a node's cores for one of its ranks."""
    if local_size >= num_cores:
        return (local_rank % num_cores,)
    base, extra = divmod(num_cores, local_size)
    start = local_rank * base + min(local_rank, extra)
    return tuple(range(start, start + base + (1 if local_rank < extra else 0)))


def allowed_cores() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def node_cores() -> int:
    """How many cores this process may run on (HYPARFLOW_NODE_CORES overrides)."""
    if os.environ.get("HYPARFLOW_NODE_CORES"):
        return int(os.environ["HYPARFLOW_NODE_CORES"])
    return len(allowed_cores())


def _env_int(names: Sequence[str]) -> int | None:
    for n in names:
        v = os.environ.get(n, "")
        if v.split("(")[0].isdigit():
            return int(v.split("(")[0])
    return None


def configure_threads(bind: bool = False) -> int:
    """Give this rank its share of the node's cores before TensorFlow starts.

    Reads the launcher's local size/rank from the environment (Open MPI, MPICH, MVAPICH,
    SLURM), so it needs no MPI call. Respects values the user already set. Returns the
    threads per rank.
    """
    local_size = _env_int(_LOCAL_SIZE_VARS) or 1
    local_rank = _env_int(_LOCAL_RANK_VARS) or 0
    cores = node_cores()
    mine = split_cores(cores, local_size, local_rank)
    # Values a parent hyparflow process chose (listed in HYPARFLOW_AUTO_THREADS) are not the
    # user's: recompute them for this process's place on the node.
    inherited = set(filter(None, os.environ.get("HYPARFLOW_AUTO_THREADS", "").split(",")))
    wanted = {
        "OMP_NUM_THREADS": str(len(mine)),
        "TF_NUM_INTRAOP_THREADS": str(len(mine)),
        "TF_NUM_INTEROP_THREADS": "1" if local_size > 1 else "2",
    }
    chosen = []
    for var, value in wanted.items():
        if var not in os.environ or var in inherited:
            os.environ[var] = value
            chosen.append(var)
    os.environ["HYPARFLOW_AUTO_THREADS"] = ",".join(chosen)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if bind or os.environ.get("HYPARFLOW_BIND") == "1":
        try:
            allowed = allowed_cores()
            os.sched_setaffinity(0, {allowed[c % len(allowed)] for c in mine})
        except (AttributeError, OSError) as e:
            log.warning("could not bind to cores %s: %s", mine, e)
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(os.environ["TF_NUM_INTRAOP_THREADS"]))
            tf.config.threading.set_inter_op_parallelism_threads(int(os.environ["TF_NUM_INTEROP_THREADS"]))
        except RuntimeError:
            pass  # TensorFlow already initialised: the environment variables above did not reach it
    return int(os.environ["TF_NUM_INTRAOP_THREADS"])


def own_cores(allowed: Iterable[int], machine: int, local_size: int, local_rank: int) -> tuple[int, ...]:
    """The cores a rank runs on: those it is bound to, where the launcher (Open MPI binds
    up to 2 ranks to a core each) or `configure_threads` bound it to fewer than the
    `machine`'s; else its share of the `allowed` ones, as its threads are counted."""
    allowed = sorted(allowed)
    if len(allowed) < machine:
        return tuple(allowed)
    return tuple(allowed[c] for c in split_cores(len(allowed), local_size, local_rank))


def discover(transport) -> list[Slot]:
    """Every rank's node, host and core share (collective over the transport's world)."""
    leader, host, local_rank, local_size = transport.node_layout()
    allowed = allowed_cores()
    cores = own_cores(allowed, os.cpu_count() or len(allowed), local_size, local_rank)
    rows = transport.allgather((leader, host, local_rank, cores))
    leaders = sorted({r[0] for r in rows})
    return [
        Slot(rank=i, node=leaders.index(r[0]), host=r[1], local_rank=r[2], cores=tuple(r[3]))
        for i, r in enumerate(rows)
    ]


def describe(
    slots: Sequence[Slot],
    assignment: Sequence[tuple[int, int]],
    stages_at: Callable[[int], Sequence[int]] | None = None,
) -> str:
    """The rank map, one line a rank (`stages_at`: the stages a pipeline position holds,
    where it holds several)."""
    lines = [f"{'rank':>4}  {'host':<20} {'node':>4} {'cores':<12} replica stage"]
    for s, (rep, st) in zip(slots, assignment):
        cores = ",".join(map(str, s.cores)) or "-"
        if len(s.cores) > 2 and list(s.cores) == list(range(s.cores[0], s.cores[-1] + 1)):
            cores = f"{s.cores[0]}-{s.cores[-1]}"
        held = ",".join(map(str, stages_at(st))) if stages_at is not None else str(st)
        lines.append(f"{s.rank:>4}  {s.host[:20]:<20} {s.node:>4} {cores:<12} {rep:>7} {held:>5}")
    return "\n".join(lines)
