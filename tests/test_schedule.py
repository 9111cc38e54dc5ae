"""Schedules are pure functions: golden timetables (as torchgpipe's clock_cycles tests),
and the invariants every schedule must keep."""

from __future__ import annotations

import pytest

from hyparflow.errors import ConfigError
from hyparflow.schedule import BACKWARD, FORWARD, clock_cycles, schedule


def picture(kind: str, ranks: int, micro: int, chunks: int = 1) -> list[str]:
    """One line per rank: what it runs at each tick ('..' when idle); with several chunks,
    each op names its chunk by a letter (Fb2: the forward of micro-batch 2 on chunk 1)."""
    ticks = clock_cycles(kind, ranks, micro, chunks)

    def cell(op: str, chunk: int, m: int) -> str:
        return f"{op}{'abcd'[chunk] if chunks > 1 else ''}{m}"

    idle = ".." + ("." if chunks > 1 else "")
    return ["".join(next((cell(*op) for q, op in row if q == p), idle) for row in ticks) for p in range(ranks)]


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


def test_interleaved_golden_table():
    # Megatron-LM's order: micro-batches in groups of P, each group through chunk a, then b.
    assert picture("interleaved", 2, 4, 2) == [
        "Fa0Fa1Fb0Fb1Fa2Bb0Fa3Bb1Fb2Ba0Fb3Ba1...Bb2...Bb3Ba2Ba3",
        "...Fa0Fa1Fb0Bb0Fb1Bb1Fa2Ba0Fa3Ba1Fb2Bb2Fb3Bb3Ba2Ba3...",
    ]


def test_interleaving_divides_the_bubble_by_the_chunks():
    # Each op of a rank holding v chunks is 1/v of a 1F1B op: the step's ticks over v
    # approach the bubble-free 2M as v grows, where 1F1B takes 2 (M + P - 1).
    for ranks, micro in [(2, 8), (4, 8), (4, 16)]:
        one = len(clock_cycles("1f1b", ranks, micro))
        two, four = (len(clock_cycles("interleaved", ranks, micro, v)) / v for v in (2, 4))
        assert one == 2 * (micro + ranks - 1)
        assert 2 * micro < four < two < one
        assert two - 2 * micro <= (one - 2 * micro) / 2 + 1


def test_interleaved_with_micro_batches_not_a_multiple_of_the_ranks_runs_forwards_first():
    ops = schedule("interleaved", 2, 0, 3, 2)
    assert [op for op, _, _ in ops] == ["F"] * 6 + ["B"] * 6


def test_schedules_take_their_number_of_chunks():
    with pytest.raises(ConfigError, match="only 'interleaved'"):
        schedule("1f1b", 2, 0, 4, 2)
    with pytest.raises(ConfigError, match="only 'interleaved'"):
        schedule("interleaved", 2, 0, 4, 1)


def test_1f1b_fewer_micro_batches_than_stages():
    assert schedule("1f1b", 4, 0, 2) == [(FORWARD, 0, 0), (FORWARD, 0, 1), (BACKWARD, 0, 0), (BACKWARD, 0, 1)]
    assert len(clock_cycles("1f1b", 4, 2)) == 2 * (4 + 2 - 1)


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
@pytest.mark.parametrize("stages,micro", [(1, 1), (2, 8), (4, 4), (4, 1), (3, 7)])
def test_every_op_once_and_bounded_in_flight(kind, stages, micro):
    for s in range(stages):
        ops = schedule(kind, stages, s, micro)
        assert sorted(ops) == sorted((op, 0, m) for op in (FORWARD, BACKWARD) for m in range(micro))
        assert peak_in_flight(ops) == (micro if kind == "gpipe" else min(stages - s, micro))
    # Both keep the pipeline's critical path: 2 (M + P - 1) ticks.
    assert len(clock_cycles(kind, stages, micro)) == 2 * (micro + stages - 1)


def peak_in_flight(ops) -> int:
    """The most forwards whose backward is still to come, checking each backward follows its forward."""
    in_flight, peak = 0, 0
    for i, (op, chunk, m) in enumerate(ops):
        assert op == FORWARD or (FORWARD, chunk, m) in ops[:i], "backward before its forward"
        in_flight += 1 if op == FORWARD else -1
        peak = max(peak, in_flight)
    return peak


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("chunks", [2, 3])
def test_interleaved_never_deadlocks_and_bounds_in_flight(ranks, chunks):
    for micro in range(1, 3 * ranks + 2):
        clock_cycles("interleaved", ranks, micro, chunks)  # raises on a deadlock
        for p in range(ranks):
            ops = schedule("interleaved", ranks, p, micro, chunks)
            pairs = [(c, m) for c in range(chunks) for m in range(micro)]
            assert sorted(ops) == sorted((op, c, m) for op in (FORWARD, BACKWARD) for c, m in pairs)
            bound = 2 * (ranks - p - 1) + (chunks - 1) * ranks + 1 if micro % ranks == 0 else micro * chunks
            assert peak_in_flight(ops) <= min(bound, micro * chunks)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="expected one of"):
        schedule("zigzag", 2, 0, 4)
