"""Pipeline schedules as pure functions.

`schedule(kind, P, p, M, v)` is the (op, chunk, micro-batch) sequence that pipeline rank
`p` runs in one training step; `clock_cycles(kind, P, M, v)` is the whole timetable, each
op taking one tick once its inputs are there (the picture of the GPipe, 1F1B and
Megatron-LM papers, and what the golden-table tests check).

A rank holds `v` chunks of the model: chunk k of rank p is stage k * P + p of the plan,
so a micro-batch goes round the ranks v times. GPipe and 1F1B hold one chunk; the
interleaved 1F1B of Narayanan et al. (2021) holds several, which divides the pipeline's
warm-up and cool-down bubble by v for v times the activation transfers.
"""

from __future__ import annotations

from hyparflow.errors import ConfigError

SCHEDULES = ("1f1b", "gpipe", "interleaved")
FORWARD, BACKWARD = "F", "B"
Op = tuple[str, int, int]  # (FORWARD or BACKWARD, chunk, micro-batch)


def check_schedule(kind: str) -> str:
    if kind not in SCHEDULES:
        raise ConfigError(f"schedule={kind!r}: expected one of {SCHEDULES}.")
    return kind


def schedule(kind: str, num_ranks: int, rank: int, num_micro: int, chunks: int = 1) -> list[Op]:
    """The (op, chunk, micro-batch) sequence one pipeline rank runs in a training step.

    GPipe: all forwards, then all backwards. 1F1B: P - p - 1 warm-up forwards, then one
    forward one backward, then the remaining backwards; at most P - p micro-batches are
    in flight on rank p, which bounds its stashed activations. Interleaved: 1F1B over
    (chunk, micro-batch) pairs taken as Megatron-LM orders them: micro-batches in groups of
    P, each group through chunk 0, then chunk 1, ...; backwards in the same order through
    the chunks from the last; 2 (P - p - 1) + (v - 1) P warm-up forwards. That order needs
    M to be a multiple of P (else some ranks would wait on each other for good): for other
    M, every forward runs first, as GPipe over the chunks.
    """
    check_schedule(kind)
    if (kind == "interleaved") != (chunks > 1):
        raise ConfigError(f"schedule={kind!r} with {chunks} chunks a rank: only 'interleaved' runs several.")
    if kind == "gpipe":
        return [(FORWARD, 0, m) for m in range(num_micro)] + [(BACKWARD, 0, m) for m in range(num_micro)]
    order = [
        (chunk, m)
        for first in range(0, num_micro, num_ranks)
        for chunk in range(chunks)
        for m in range(first, min(first + num_ranks, num_micro))
    ]
    forwards = [(FORWARD, c, m) for c, m in order]
    backwards = [(BACKWARD, chunks - 1 - c, m) for c, m in order]
    warmup = num_ranks - rank - 1 if chunks == 1 else 2 * (num_ranks - rank - 1) + (chunks - 1) * num_ranks
    warmup = len(order) if chunks > 1 and num_micro % num_ranks else min(warmup, len(order))
    ops = forwards[:warmup]
    for i, f in enumerate(forwards[warmup:]):
        ops += [f, backwards[i]]
    return ops + backwards[len(order) - warmup :]


def clock_cycles(kind: str, num_ranks: int, num_micro: int, chunks: int = 1) -> list[list[tuple[int, Op]]]:
    """The step's timetable: at each tick, the (rank, op) pairs that run.

    Each rank runs its `schedule` in order; an op runs at the first tick after its
    dependencies, on stages s = chunk * P + rank: F(s, m) after F(s-1, m); B(s, m) after
    F(s, m) and B(s+1, m).
    """
    last = num_ranks * chunks - 1
    done: dict[tuple[str, int, int], int] = {}
    queues = [schedule(kind, num_ranks, p, num_micro, chunks) for p in range(num_ranks)]
    ticks: list[list[tuple[int, Op]]] = []
    while any(queues):
        now = len(ticks)
        row = []
        for p, queue in enumerate(queues):
            if not queue:
                continue
            op, chunk, m = queue[0]
            s = chunk * num_ranks + p
            deps = [(FORWARD, s - 1, m)] if op == FORWARD and s > 0 else []
            if op == BACKWARD:
                deps = [(FORWARD, s, m)] + ([(BACKWARD, s + 1, m)] if s < last else [])
            if all(d in done and done[d] < now for d in deps):
                row.append((p, queue[0]))
        if not row:
            raise RuntimeError(f"schedule {kind!r} deadlocks at tick {now}")
        for p, (op, chunk, m) in row:
            queues[p].pop(0)
            done[(op, chunk * num_ranks + p, m)] = now
        ticks.append(row)
    return ticks
