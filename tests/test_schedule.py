"""Schedules are pure functions: golden timetables (as torchgpipe's clock_cycles tests),
and the invariants every schedule must keep."""

from __future__ import annotations

import pytest

from hyparflow.errors import ConfigError
from hyparflow.schedule import BACKWARD, FORWARD, SCHEDULES, clock_cycles, schedule


def picture(kind: str, stages: int, micro: int) -> list[str]:
    """One line per stage: what it runs at each tick ('..' when idle)."""
    ticks = clock_cycles(kind, stages, micro)
    return ["".join(next((f"{op}{m}" for st, op, m in row if st == s), "..") for row in ticks) for s in range(stages)]


def test_gpipe_golden_table():
    assert picture("gpipe", 3, 4) == [
        "F0F1F2F3........B0B1B2B3",
        "..F0F1F2F3....B0B1B2B3..",
        "....F0F1F2F3B0B1B2B3....",
    ]


def test_1f1b_golden_table():
    assert picture("1f1b", 3, 4) == [
        "F0F1F2....B0F3B1..B2..B3",
        "..F0F1..B0F2B1F3B2..B3..",
        "....F0B0F1B1F2B2F3B3....",
    ]


def test_1f1b_fewer_micro_batches_than_stages():
    assert schedule("1f1b", 4, 0, 2) == [(FORWARD, 0), (FORWARD, 1), (BACKWARD, 0), (BACKWARD, 1)]
    assert len(clock_cycles("1f1b", 4, 2)) == 2 * (4 + 2 - 1)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("stages,micro", [(1, 1), (2, 8), (4, 4), (4, 1), (3, 7)])
def test_every_op_once_and_bounded_in_flight(kind, stages, micro):
    for s in range(stages):
        ops = schedule(kind, stages, s, micro)
        assert sorted(ops) == sorted((op, m) for op in (FORWARD, BACKWARD) for m in range(micro))
        in_flight, peak = 0, 0
        for op, m in ops:
            assert op == FORWARD or (FORWARD, m) in ops[: ops.index((op, m))], "backward before its forward"
            in_flight += 1 if op == FORWARD else -1
            peak = max(peak, in_flight)
        assert peak == (micro if kind == "gpipe" else min(stages - s, micro))
    # Both keep the pipeline's critical path: 2 (M + P - 1) ticks.
    assert len(clock_cycles(kind, stages, micro)) == 2 * (micro + stages - 1)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="expected one of"):
        schedule("zigzag", 2, 0, 4)
