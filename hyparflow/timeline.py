"""The timeline: what every rank did during `fit`, and when, on one clock, in one trace file.

`hf.fit(..., timeline="trace.json")` (or `HYPARFLOW_TIMELINE=trace.json`, as Horovod's
`HOROVOD_TIMELINE`) records on every rank each forward and backward per micro-batch (one
fused event on stages that run both at once), each wait on a peer or a collective, each
send, the start of each gradient bucket's allreduce ("bucket", inside the backward that
hands it over) and the wait for them all ("allreduce"), the optimizer step, data loading and batch preparation, and
callbacks. Rank 0 merges all ranks into one Chrome-trace JSON file (open it in
https://ui.perfetto.dev or chrome://tracing): one process row per rank, named
"rank R (replica r, stage s)", with "X" complete events and one "step" event around each
step. `hyparflow timeline trace.json --png schedule.png` draws it as a Gantt chart.

Clocks: each rank stamps events with its own monotonic clock. Rank 0 estimates every
rank's offset by ping-pong through the transport, keeping the round trip with the least
latency (its error is at most half that round trip), once before training and once after;
events are mapped onto rank 0's clock by interpolating the two, which also absorbs drift
between hosts.

Off, the engine pays one attribute check per event site: the executor, the transport, the
session and the callbacks hold `timeline = None`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from hyparflow.failures import phase

ENV = "HYPARFLOW_TIMELINE"
CLOCK_TAG = 30_050  # world tag of the clock ping-pongs (transport's own: 30_001 control, 30_100 + stage state)
CLOCK_ROUNDS = 16
now = time.perf_counter

# An event as recorded: (name, category, start, end, (mode, step) or None, args or None), times in seconds.
Event = tuple[str, str, float, float, "tuple[str, int] | None", "dict[str, Any] | None"]


def path_from(argument: str | None) -> str | None:
    """The trace file `fit` writes: its `timeline` argument, else HYPARFLOW_TIMELINE, else none."""
    return argument if argument is not None else (os.environ.get(ENV) or None)


class Timeline:
    """One rank's recorder for one `fit` call (see the module docstring)."""

    def __init__(self, session, path: str):
        self.session, self.path = session, path
        self.events: list[Event] = []
        self.step: tuple[str, int] | None = None  # (mode, index) of the step in progress
        self._steps: dict[str, int] = {}
        self._step_start = 0.0
        self._clock_start = _clock_offsets(session.transport)

    @classmethod
    def start(cls, session, path: str) -> Timeline:
        """Align the clocks (all ranks take part) and start recording on this rank."""
        with phase("timeline clock alignment"):
            timeline = cls(session, path)
        _attach(session, timeline)
        return timeline

    # ---- recording ----------------------------------------------------------------------
    def add(self, name: str, cat: str, t0: float, t1: float | None = None, args: dict[str, Any] | None = None) -> None:
        """Record an event from `t0` to `t1` (default: now), inside the step in progress if any."""
        self.events.append((name, cat, t0, now() if t1 is None else t1, self.step, args))

    @contextlib.contextmanager
    def span(self, name: str, cat: str, args: dict[str, Any] | None = None) -> Iterator[None]:
        """Record the block as one event."""
        t0 = now()
        yield
        self.add(name, cat, t0, args=args)

    def begin_step(self, mode: str) -> None:
        """A step of `mode` ("train", "test", "predict") starts: later events belong to it."""
        index = self._steps.get(mode, 0)
        self._steps[mode] = index + 1
        self.step, self._step_start = (mode, index), now()

    def end_step(self) -> None:
        assert self.step is not None
        mode, index = self.step
        self.add(f"{mode} step {index}", "step", self._step_start)
        self.step = None

    # ---- merging ------------------------------------------------------------------------
    def finish(self) -> dict[str, Any] | None:
        """Stop recording, align the clocks again, and merge every rank's events into the
        trace file on rank 0 (all ranks take part). Returns the trace on rank 0."""
        session = self.session
        _attach(session, None)
        with phase("timeline merge"):
            clock_end = _clock_offsets(session.transport)
            gathered = session.transport.gather(self.events, root=0)
        if gathered is None or self._clock_start is None or clock_end is None:
            return None  # not rank 0: only rank 0 gathers and estimates the clocks
        trace = _chrome_trace(gathered, self._clock_start, clock_end, session)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(trace, separators=(",", ":")))  # one string: several times faster than json.dump
        os.replace(tmp, self.path)
        return trace


def _attach(session, timeline: Timeline | None) -> None:
    """Point every event site of the session at `timeline` (None: stop recording)."""
    session.timeline = timeline
    session.transport.timeline = timeline
    session.executor_or_fail().timeline = timeline


def timed_batches(timeline: Timeline | None, batches: Iterable) -> Iterable:
    """`batches`, recording the time each one takes to load when a timeline records."""
    return batches if timeline is None else _timed(timeline, batches)


def _timed(timeline: Timeline, batches: Iterable) -> Iterator:
    items = iter(batches)
    while True:
        t0 = now()
        try:
            item = next(items)
        except StopIteration:
            return
        timeline.add("load batch", "data", t0)
        yield item


def _clock_offsets(transport) -> np.ndarray | None:
    """On rank 0, per rank: (its clock minus rank 0's, rank 0's time of the estimate, the
    round trip it came from), from the fastest of CLOCK_ROUNDS ping-pongs; None elsewhere."""
    stamp = np.zeros(1)
    if transport.rank != 0:
        for _ in range(CLOCK_ROUNDS):
            transport.recv_array(stamp, 0, CLOCK_TAG, "clock ping")
            stamp[0] = now()
            transport.send_array(stamp, 0, CLOCK_TAG, "clock pong")
        return None
    table = np.zeros((transport.size, 3))
    table[0, 1] = now()
    for rank in range(1, transport.size):
        table[rank, 2] = np.inf
        for _ in range(CLOCK_ROUNDS):
            sent = now()
            transport.send_array(stamp, rank, CLOCK_TAG, "clock ping")
            transport.recv_array(stamp, rank, CLOCK_TAG, "clock pong")
            back = now()
            if back - sent < table[rank, 2]:
                table[rank] = (stamp[0] - (sent + back) / 2, (sent + back) / 2, back - sent)
    return table


def _to_rank0(t: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Times `t` of one rank on rank 0's clock, the offset interpolated between the estimates
    `start` and `end` (rows of `_clock_offsets`)."""
    span = end[1] - start[1]
    drift = (end[0] - start[0]) / span if span > 0 else 0.0
    return t - (start[0] + drift * (t - start[0] - start[1]))


def _chrome_trace(per_rank: list[list[Event]], start: np.ndarray, end: np.ndarray, session) -> dict[str, Any]:
    """The merged Chrome trace: times in microseconds from the first event, on rank 0's clock."""
    grid = session.grid
    placed = {rank: (replica, p) for replica, row in enumerate(grid.ranks) for p, rank in enumerate(row)}
    aligned = []
    for rank, events in enumerate(per_rank):
        times = np.array([(e[2], e[3]) for e in events], float).reshape(-1, 2)
        aligned.append(_to_rank0(times, start[rank], end[rank]))
    origin = min((float(a.min()) for a in aligned if a.size), default=0.0)
    # (ts, dur) in microseconds, rounded to nanoseconds: converted per rank at once, not per event
    micros = [np.round(np.stack([a[:, 0] - origin, a[:, 1] - a[:, 0]], axis=1) * 1e6, 3).tolist() for a in aligned]
    out: list[dict[str, Any]] = []
    ranks = []
    for rank, events in enumerate(per_rank):
        replica, stage = placed[rank]
        ranks.append({"rank": rank, "replica": replica, "stage": stage, "stages": list(grid.stages_at(stage))})
        out.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": grid.where(rank)}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for (name, cat, _, _, step, args), (ts, dur) in zip(events, micros[rank]):
            event = {"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": 0, "ts": ts, "dur": dur}
            extra = dict(args or {})
            if step is not None:
                extra.update(mode=step[0], step=step[1])
            if extra:
                event["args"] = extra
            out.append(event)
    layout = session.layout
    other = {
        "schedule": layout.schedule,
        "num_partitions": layout.num_partitions,
        "virtual_stages": layout.virtual_stages,
        "num_replicas": layout.num_replicas,
        "num_microbatches": layout.num_microbatches,
        "ranks": ranks,
        "clock_error_us": [round(float(rtt) / 2 * 1e6, 3) for rtt in np.maximum(start[:, 2], end[:, 2])],
    }
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": other}
