"""`hyparflow timeline trace.json --png schedule.png`: a timeline (see `hyparflow.timeline`)
drawn as a Gantt chart of ranks x time, as the GPipe and 1F1B papers draw their schedules:
forwards, backwards, waits, allreduce, optimizer, data and callbacks coloured, each compute
box labelled with its micro-batch, step boundaries dashed. It also prints where each rank's
time went over the same window.

Events nest (a gradient allreduce contains its wait, a step contains everything), so each
instant is attributed to the innermost-drawn category of `LAYERS`: what the chart shows is
what the shares count.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hyparflow.errors import ConfigError

# Drawing order, bottom to top, and colours. "step" is drawn as boundaries, not boxes.
LAYERS = {
    "wait": "#d9d9d9",
    "data": "#ccb974",
    "callback": "#da8bc3",
    "send": "#222222",
    "forward": "#4c72b0",
    "backward": "#55a868",
    "fused": "#2a9d8f",
    "allreduce": "#c44e52",
    "optimizer": "#dd8452",
}
COMPUTE = ("forward", "backward", "fused")
LABELS = {"fused": "forward+backward", "wait": "wait (peer or collective)"}


def load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def ranks(trace: dict[str, Any]) -> list[dict[str, int]]:
    """The trace's ranks in (replica, stage) order: the Gantt rows, top to bottom."""
    return sorted(trace["otherData"]["ranks"], key=lambda r: (r["replica"], r["stage"]))


def _stages(row: dict[str, Any]) -> str:
    """The stages a rank holds ('1', or '1,3' under an interleaved schedule)."""
    return ",".join(map(str, row.get("stages", [row["stage"]])))


def _who(row: dict[str, Any]) -> str:
    """'   3 (1, 0)': rank (replica, stages)."""
    return f"{row['rank']:>4} ({row['replica']}, {_stages(row)})"


def train_steps(trace: dict[str, Any]) -> dict[int, dict[int, tuple[float, float]]]:
    """{step: {rank: (start, end)}} of the training steps, in microseconds."""
    steps: dict[int, dict[int, tuple[float, float]]] = {}
    for e in trace["traceEvents"]:
        if e.get("cat") == "step" and e["args"]["mode"] == "train":
            steps.setdefault(e["args"]["step"], {})[e["pid"]] = (e["ts"], e["ts"] + e["dur"])
    return steps


def window(trace: dict[str, Any], first: int | None = None, last: int | None = None) -> tuple[float, float, int, int]:
    """(start, end, first, last): the span of training steps `first`..`last` on all ranks.
    Default: the two consecutive steps that took least time together, a steady state past the
    first steps (which compile the stage functions and build the optimizer)."""
    steps = train_steps(trace)
    if not steps:
        raise ConfigError("the trace holds no training step")

    def span(a: int, b: int) -> tuple[float, float]:
        ends = [t for s in range(a, b + 1) for t in steps[s].values()]
        return min(t for t, _ in ends), max(t for _, t in ends)

    if first is None:
        pairs = [(s, s + 1) for s in range(len(steps) - 1)] or [(0, 0)]
        first, last = min(pairs, key=lambda p: span(*p)[1] - span(*p)[0])
    last = first if last is None else last
    if not (0 <= first <= last < len(steps)):
        raise ConfigError(f"steps {first}..{last}: the trace has training steps 0..{len(steps) - 1}")
    return (*span(first, last), first, last)


def _boxes(trace: dict[str, Any], start: float, end: float) -> dict[int, list[dict[str, Any]]]:
    """Per rank, the drawable events overlapping [start, end]."""
    out: dict[int, list[dict[str, Any]]] = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e["cat"] in LAYERS and e["ts"] < end and e["ts"] + e["dur"] > start:
            out.setdefault(e["pid"], []).append(e)
    return out


def shares(trace: dict[str, Any], start: float, end: float) -> dict[int, dict[str, float]]:
    """Per rank, the fraction of [start, end] each category is the top-drawn one ("idle": none)."""
    order = list(LAYERS)
    result = {}
    for rank, events in _boxes(trace, start, end).items():
        cuts = sorted({start, end} | {min(max(t, start), end) for e in events for t in (e["ts"], e["ts"] + e["dur"])})
        spent = dict.fromkeys(order + ["idle"], 0.0)
        for a, b in zip(cuts, cuts[1:]):
            covering = [order.index(e["cat"]) for e in events if e["ts"] <= a and e["ts"] + e["dur"] >= b]
            spent[order[max(covering)] if covering else "idle"] += b - a
        result[rank] = {k: v / (end - start) for k, v in spent.items()}
    return result


def draw(trace: dict[str, Any], png: str, first: int | None = None, last: int | None = None) -> None:
    """Write the Gantt chart of training steps `first`..`last` (see `window`) to `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    start, end, first, last = window(trace, first, last)
    rows = ranks(trace)
    boxes, steps = _boxes(trace, start, end), train_steps(trace)
    ms = 1e-3
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(rows) + 1.8))
    for y, row in enumerate(rows):
        events = boxes.get(row["rank"], [])
        for cat, colour in LAYERS.items():
            spans = [((e["ts"] - start) * ms, max(e["dur"], 0.0) * ms) for e in events if e["cat"] == cat]
            ax.broken_barh(
                spans, (y - 0.4, 0.8), facecolors=colour, edgecolor="white" if cat in COMPUTE else "none", linewidth=0.4
            )
        for e in events:
            if e["cat"] in COMPUTE and e["dur"] > 0.012 * (end - start):
                ax.text(
                    (e["ts"] + e["dur"] / 2 - start) * ms,
                    y,
                    str(e["args"]["micro_batch"]),
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=7,
                )
        for s in range(first, last + 1):
            a, b = steps[s].get(row["rank"], (start, start))
            ax.vlines(
                [(a - start) * ms, (b - start) * ms],
                y - 0.48,
                y + 0.48,
                colors="black",
                linestyles="dashed",
                linewidth=0.8,
            )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"replica {r['replica']}, stage {_stages(r)}\n(rank {r['rank']})" for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, (end - start) * ms)
    ax.set_xlabel("time (ms, one clock for all ranks)")
    info = trace["otherData"]
    steps_text = f"step {first}" if first == last else f"steps {first}-{last}"
    ax.set_title(
        f"{info['schedule']} schedule, P={info['num_partitions']} x R={info['num_replicas']}, "
        f"M={info['num_microbatches']}: training {steps_text} (dashed: step boundaries)",
        fontsize=10,
    )
    legend = [Patch(facecolor=c, label=LABELS.get(k, k)) for k, c in LAYERS.items()]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(png, dpi=130)
    plt.close(fig)


def summary(trace: dict[str, Any], first: int | None = None, last: int | None = None) -> str:
    """Where each rank's time went over the window, as a table of percentages."""
    start, end, first, last = window(trace, first, last)
    table = shares(trace, start, end)
    cols = ["compute", "wait", "allreduce", "optimizer", "data", "callback", "send", "idle"]
    lines = [
        f"training steps {first}-{last}: {(end - start) / 1e3:.1f} ms on one clock; share of that time per rank (%)",
        f"{'rank (replica, stage)':<24}" + "".join(f"{c:>10}" for c in cols),
    ]
    for row in ranks(trace):
        got = table.get(row["rank"], {})
        got = {**got, "compute": sum(got.get(c, 0.0) for c in COMPUTE)}
        lines.append(f"{_who(row):<24}" + "".join(f"{100 * got.get(c, 0.0):>10.1f}" for c in cols))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="a Chrome-trace file written by fit(timeline=...) or HYPARFLOW_TIMELINE")
    p.add_argument("--png", help="write the Gantt chart here")
    p.add_argument(
        "--steps", default=None, help="training steps to show, 'A' or 'A:B' (default: the fastest two in a row)"
    )


def main(args: argparse.Namespace) -> int:
    trace = load(args.trace)
    first = last = None
    if args.steps:
        a, _, b = args.steps.partition(":")
        if not (a.isdigit() and (b or a).isdigit()):
            raise ConfigError(f"--steps {args.steps!r}: expected 'A' or 'A:B' (training step numbers).")
        first, last = int(a), int(b or a)
    print(summary(trace, first, last))
    if args.png:
        draw(trace, args.png, first, last)
        print(f"wrote {args.png}")
    return 0
