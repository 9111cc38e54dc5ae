"""Re-cutting a time-balanced plan from the stages' own times, measured in the pipeline.

The "time" balance profiles layer calls in one process. In the pipeline a stage that
sends on runs its forward and backward apart, each rank with its own threads, and the
last stage runs fused: a stage's cost differs from its profile by a factor of its own
(stop 20 measured one 14% over). So before a new session's first update, `rebalance`
runs a few steps that update nothing, rescales each stage's profiled call costs to its
measured compute, and moves the cuts where that predicts a faster slowest stage
(`partition.recut`), then times the new cuts the same way; it keeps the cuts whose
slowest rank (the sum of its stages, under an interleaved schedule) was fastest. A move
costs a gather and a scatter of the weights and a new trace of the stages' functions, so
cuts move only when the predicted saving over the fit's steps pays for that. Every rank
takes rank 0's decision; results are unchanged: the steps update no weight, their
non-trainable state (BatchNorm statistics, seed generators) and accumulators are put
back, and the metrics start over with the first epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any

import numpy as np

from hyparflow import partition
from hyparflow.errors import ConfigError
from hyparflow.inputs import ArraySource

log = logging.getLogger("hyparflow")

TIMED_STEPS = 2  # after one untimed step, which traces the stage's functions
MIN_STEPS = 10 * (TIMED_STEPS + 1)  # the trial costs at most a tenth of the fit's steps
MIN_GAIN = 0.03  # of the slowest stage: below this, a predicted gain is within the timings' noise
ROUNDS = 3  # timed cuts at most


def eligible(session, source, epochs: int) -> bool:
    """Whether a fit of `epochs` epochs of `source` rebalances its new session: a "time"
    plan with micro-batches to pipeline, array data (a stream's first batches cannot be
    read twice), a fresh optimizer (moved layers carry no slots), and cuts that can move
    without a whole-model pass on the ranks (no masks, no layer called on two stages)."""
    graph, optimizer = session.plan.graph, getattr(session.model, "optimizer", None)
    return (
        not session.rebalanced
        and session.plan.balance == "time"
        and session.P > 1
        and session.M > 1
        and isinstance(source, ArraySource)
        and source.steps * epochs >= MIN_STEPS
        and optimizer is not None
        and not getattr(optimizer, "built", False)
        and not session.compute.loss_scaled
        and all(t.mask_of < 0 for t in graph.tensors)
        and len({id(c.layer) for c in graph.calls}) == len(graph.calls)
    )


def rebalance(session, source: ArraySource, epoch: int, steps: int, hint: str | None) -> None:
    """Time the session's cuts, and move them while that predicts a saving (see the module
    docstring). `steps`: the fit's remaining steps; `hint`: as `Session.start`'s."""
    session.rebalanced = True
    data, idx = next(iter(source.epoch(epoch)))
    timed: dict[tuple[int, ...], float] = {}
    starts = list(session.plan.starts)
    for rounds_left in range(ROUNDS - 1, -1, -1):
        seconds, trace = _trial(session, data, idx)
        grid = session.grid
        timed[tuple(starts)] = max(sum(seconds[s] for s in grid.stages_at(p)) for p in range(grid.num_partitions))
        proposal = _propose(session, starts, seconds, trace, steps) if rounds_left else None
        if proposal is None or tuple(proposal) in timed:
            break
        _say(session, "cuts %s: stages compute %s s per step; moving to %s", starts, _rounded(seconds), proposal)
        session.recut(proposal, hint)
        starts = proposal
    best = min(timed, key=lambda s: timed[s])
    if list(best) != starts:
        _say(session, "cuts %s: slowest rank %.4f s per step; back to %s (%.4f s)", starts, timed[tuple(starts)],
             list(best), timed[best])  # fmt: skip
        session.recut(list(best), hint)
    else:
        _say(session, "cuts %s: stages compute %s s per step; keeping them", starts, _rounded(seconds))


def _say(session, text: str, *args) -> None:
    if session.transport.rank == 0:
        log.info("rebalance: " + text, *args)


def _rounded(seconds: list[float]) -> list[float]:
    return [round(t, 4) for t in seconds]


def _trial(session, data, idx) -> tuple[list[float], float]:
    """Every stage's compute seconds per step (averaged over replicas), and the most any
    rank's first step took beyond its later ones (tracing): the same on every rank."""
    executor = session.executor_or_fail()
    c = executor.compute
    state = [v.numpy() for v in c.state]
    walls, computes = [], []
    for _ in range(TIMED_STEPS + 1):
        micro, norm = session.micro_batches(data, idx)
        t0, before = time.perf_counter(), dict(executor.stage_compute)
        executor.train_step(micro, norm, dry=True)
        walls.append(time.perf_counter() - t0)
        computes.append({s: t - before[s] for s, t in executor.stage_compute.items()})
    for v, value in zip(c.state, state):
        v.assign(value)
    for a in c.acc:
        a.assign(np.zeros(a.shape, a.dtype.as_numpy_dtype))
    c.rows.clear()
    mine = {s: float(np.mean([step[s] for step in computes[1:]])) for s in c.stages}
    everyone = session.transport.allgather((mine, walls[0] - float(np.mean(walls[1:]))))
    stages = range(session.plan.num_partitions)
    seconds = [float(np.mean([held[s] for held, _ in everyone if s in held])) for s in stages]
    return seconds, max(extra for _, extra in everyone)


def _propose(session, starts: list[int], seconds: list[float], trace: float, steps: int) -> list[int] | None:
    """Rank 0's new cuts for every rank, or None where moving would not pay."""
    proposal: Any = None
    plan = session.plan
    if session.transport.rank == 0:
        limits = (plan.call_memory, session.memory_limit, plan.graph.uncuttable())
        found = decide(plan.call_costs, starts, seconds, trace, steps, *limits)
        proposal = found if found is not None and _movable(plan, found) else None
    return session.transport.bcast(proposal)


def decide(
    costs: list[float],
    starts: list[int],
    seconds: list[float],
    trace: float,
    steps: int,
    memory: list[float] | None = None,
    memory_limit: float | None = None,
    uncuttable: Collection[int] = (),
) -> list[int] | None:
    """The cuts `partition.recut` finds from the stages' `seconds` per step, where they
    predict a slowest stage faster by more than the timings' noise, and by more over the
    fit's `steps` than a move costs (a `trace` and a trial); else None."""
    found, predicted = partition.recut(costs, starts, seconds, memory, memory_limit, uncuttable)
    slowest = max(seconds)
    gain, cost = slowest - predicted, trace + (TIMED_STEPS + 1) * slowest
    return found if found != starts and gain > MIN_GAIN * slowest and gain * steps > cost else None


def _movable(plan, starts: list[int]) -> bool:
    """Whether cuts at `starts` form a plan whose boundary tensors can be sent."""
    try:
        partition.Plan(plan.graph, starts, plan.balance)
    except ConfigError:
        return False
    return True
