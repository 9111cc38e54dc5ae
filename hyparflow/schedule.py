"""Pipeline schedules as pure functions.

`schedule(kind, P, s, M)` is the (op, micro-batch) sequence stage `s` runs in one
training step; `clock_cycles(kind, P, M)` is the whole timetable, each op taking one
tick once its inputs are there (the picture of the GPipe and 1F1B papers, and what the
golden-table tests check).
"""

from __future__ import annotations

from hyparflow.errors import ConfigError

SCHEDULES = ("1f1b", "gpipe")
FORWARD, BACKWARD = "F", "B"
Op = tuple[str, int]


def check_schedule(kind: str) -> str:
    if kind not in SCHEDULES:
        raise ConfigError(f"schedule={kind!r}: expected one of {SCHEDULES}.")
    return kind


def schedule(kind: str, num_stages: int, stage: int, num_micro: int) -> list[Op]:
    """The (op, micro-batch) sequence one stage runs in a training step.

    GPipe: all forwards, then all backwards. 1F1B: P - s - 1 warm-up forwards, then one
    forward one backward, then the remaining backwards; at most P - s micro-batches are
    in flight on stage s, which bounds its stashed activations.
    """
    check_schedule(kind)
    if kind == "gpipe":
        return [(FORWARD, m) for m in range(num_micro)] + [(BACKWARD, m) for m in range(num_micro)]
    warmup = min(num_stages - stage - 1, num_micro)
    ops = [(FORWARD, m) for m in range(warmup)]
    for f in range(warmup, num_micro):
        ops += [(FORWARD, f), (BACKWARD, f - warmup)]
    ops += [(BACKWARD, b) for b in range(num_micro - warmup, num_micro)]
    return ops


def clock_cycles(kind: str, num_stages: int, num_micro: int) -> list[list[tuple[int, str, int]]]:
    """The step's timetable: at each tick, the (stage, op, micro-batch) that run.

    Each stage runs its `schedule` in order; an op runs at the first tick after its
    dependencies (F(s, m) after F(s-1, m); B(s, m) after B(s+1, m) and F(s, m)).
    """
    done: dict[tuple[int, str, int], int] = {}
    queues = [schedule(kind, num_stages, s, num_micro) for s in range(num_stages)]
    ticks: list[list[tuple[int, str, int]]] = []
    while any(queues):
        now = len(ticks)
        row = []
        for s, queue in enumerate(queues):
            if not queue:
                continue
            op, m = queue[0]
            deps = [(s - 1, FORWARD, m)] if op == FORWARD and s > 0 else []
            if op == BACKWARD:
                deps = [(s, FORWARD, m)] + ([(s + 1, BACKWARD, m)] if s < num_stages - 1 else [])
            if all(d in done and done[d] < now for d in deps):
                row.append((s, op, m))
        if not row:
            raise RuntimeError(f"schedule {kind!r} deadlocks at tick {now}")
        for s, op, m in row:
            queues[s].pop(0)
            done[(s, op, m)] = now
        ticks.append(row)
    return ticks
