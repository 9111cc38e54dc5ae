"""The timeline of `fit(timeline=...)`: under real mpirun (4 ranks, one launch) and on
loopback ranks, every rank's row, one forward and one backward (or one fused event) per
micro-batch and step in the schedule's order, no overlaps (input gradients are sent from
inside the backward that made them), causality across stages on the merged clock, and the
Gantt chart drawn from the file."""

from __future__ import annotations

import json
from collections import defaultdict

import keras
import numpy as np
import pytest
import zoo
from conftest import run_script

import hyparflow as hf
from hyparflow import cli, gantt, loopback
from hyparflow.schedule import FORWARD, schedule

SEQUENTIAL = ("forward", "backward", "fused", "allreduce", "optimizer", "data", "callback")  # never nest
COMPUTE = ("forward", "backward", "fused")


def inside(e: dict, outer: dict) -> bool:
    return outer["ts"] <= e["ts"] and e["ts"] + e["dur"] <= outer["ts"] + outer["dur"] + 0.01


def overlap(a: dict, b: dict) -> bool:
    return a["ts"] < b["ts"] + b["dur"] - 0.01 and b["ts"] < a["ts"] + a["dur"] - 0.01


def check_trace(trace: dict, kind: str, P: int, R: int, M: int, steps: int, test_steps: int, v: int = 1) -> None:
    """Assert everything a timeline promises about a fit of zoo.mlp (its last stage fused),
    its ranks holding `v` stages each."""
    info, events = trace["otherData"], [e for e in trace["traceEvents"] if e["ph"] == "X"]
    layout = (info["schedule"], info["num_partitions"], info["num_replicas"], info["num_microbatches"])
    assert layout + (info["virtual_stages"],) == (kind, P, R, M, v)
    place = {r["rank"]: (r["replica"], r["stage"]) for r in info["ranks"]}  # (replica, pipeline position)
    ranks_of = {v: k for k, v in place.items()}
    assert sorted(place) == list(range(P * R))
    assert sorted(place.values()) == [(r, s) for r in range(R) for s in range(P)]
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    names = {e["pid"]: e["args"]["name"] for e in meta}
    held = {p: ", ".join(str(p + k * P) for k in range(v)) for p in range(P)}
    plural = "s" if v > 1 else ""
    assert names == {rank: f"rank {rank} (replica {r}, stage{plural} {held[p]})" for rank, (r, p) in place.items()}
    by_rank = defaultdict(list)
    for e in events:
        by_rank[e["pid"]].append(e)
    last_stage = P * v - 1
    compute: dict[tuple, dict] = {}  # (replica, stage, step, op, m) -> event
    for rank, mine in by_rank.items():
        replica, position = place[rank]
        mine.sort(key=lambda e: e["ts"])
        step_events = [e for e in mine if e["cat"] == "step"]
        trained = [e["name"] for e in step_events if e["args"]["mode"] == "train"]
        assert trained == [f"train step {i}" for i in range(steps)]
        assert sum(e["args"]["mode"] == "test" for e in step_events) == test_steps
        flat = [e for e in mine if e["cat"] in SEQUENTIAL]
        for a, b in zip(flat, flat[1:]):
            assert b["ts"] >= a["ts"] + a["dur"] - 0.01, f"rank {rank}: {a['name']} overlaps {b['name']}"
        sends = [e for e in mine if e["cat"] == "send"]
        for a, b in zip(sends, sends[1:]):
            assert not overlap(a, b), f"rank {rank}: two sends overlap"
        for e in sends:  # activations leave after their forward, input gradients inside their backward
            around = [c for c in flat if overlap(e, c)]
            assert len(around) <= 1, f"rank {rank}: a send overlaps {len(around)} events"
            if around:
                assert inside(e, around[0]) and around[0]["cat"] in COMPUTE, f"rank {rank}: {around[0]['name']}"
        expected = []
        for op, k, m in schedule(kind, P, position, M, v):
            stage = k * P + position
            if op == FORWARD:
                expected.append(("fused" if stage == last_stage else "forward", stage, m))
            elif stage != last_stage:
                expected.append(("backward", stage, m))
        for i in range(steps):
            ops = [e for e in mine if e["cat"] in COMPUTE and e["args"]["mode"] == "train" and e["args"]["step"] == i]
            got = [(e["cat"], e["args"]["stage"], e["args"]["micro_batch"]) for e in ops]
            assert got == expected, f"rank {rank}, step {i}"
            for e in ops:
                op = "B" if e["cat"] == "backward" else "F"
                compute[(replica, e["args"]["stage"], i, op, e["args"]["micro_batch"])] = e
        assert sum(e["cat"] == "optimizer" for e in mine) == steps
        assert sum(e["cat"] == "allreduce" for e in mine) == (steps if R > 1 else 0)
        assert {e["cat"] for e in mine} >= {"data", "callback", "send", "wait"}
        if R > 1:
            check_buckets_start_in_the_last_backward(mine, steps, rank)
        feeders = {ranks_of[(replica, (s - 1) % P)] for s in range(position, last_stage + 1, P) if s > 0}
        waits = [e for e in mine if e["cat"] == "wait" and "activations of micro-batch" in e["args"]["for"]]
        assert bool(waits) == bool(feeders) and {e["args"]["peer"] for e in waits} == feeders

    def rank_of(replica: int, stage: int) -> int:
        return ranks_of[(replica, stage % P)]

    err = info["clock_error_us"]
    for (replica, stage, i, op, m), e in compute.items():
        if op == "F" and stage < last_stage:  # activations flow forward after the forward...
            after, before = compute[(replica, stage + 1, i, "F", m)], e
        elif op == "B" and stage < last_stage:  # ...and their gradients back from inside the backward
            made_in = compute[(replica, stage + 1, i, "B" if stage + 1 < last_stage else "F", m)]
            (before,) = [
                s
                for s in by_rank[rank_of(replica, stage + 1)]
                if s["cat"] == "send" and s["name"] == f"send to rank {rank_of(replica, stage)}" and inside(s, made_in)
            ]
            after = e
        else:
            continue
        tol = err[rank_of(replica, stage)] + err[rank_of(replica, stage + 1)] + 0.01
        assert after["ts"] >= before["ts"] + before["dur"] - tol, (replica, stage, i, op, m)


def check_buckets_start_in_the_last_backward(mine: list[dict], steps: int, rank: int) -> None:
    """Each step's gradient buckets are handed to the allreduce in order from inside the
    step's last compute event (the allreduce overlaps the backward), before it is waited on."""
    for i in range(steps):
        in_step = [e for e in mine if e.get("args", {}).get("mode") == "train" and e["args"].get("step") == i]
        last = max((e for e in in_step if e["cat"] in ("backward", "fused")), key=lambda e: e["ts"])
        buckets = sorted((e for e in in_step if e["cat"] == "bucket"), key=lambda e: e["ts"])
        assert [e["name"] for e in buckets] == [f"allreduce of bucket {k} started" for k in range(len(buckets))]
        assert len(buckets) > 1, f"rank {rank}, step {i}: {len(buckets)} buckets"
        end = last["ts"] + last["dur"]
        assert all(last["ts"] <= e["ts"] and e["ts"] + e["dur"] <= end for e in buckets), f"rank {rank}, step {i}"
        (reduce,) = [e for e in in_step if e["cat"] == "allreduce"]
        assert reduce["ts"] >= end - 0.01


@pytest.mark.mpi
def test_timeline_under_mpirun(tmp_path):
    r = run_script(4, "timeline.py", tmp=tmp_path, timeout=600)
    for kind, run in r["runs"].items():
        with open(run["path"]) as f:
            trace = json.load(f)
        check_trace(trace, kind, run["P"], run["R"], run["M"], run["steps"], run["test_steps"])
        png = tmp_path / f"{kind}.png"
        assert cli.main(["timeline", run["path"], "--png", str(png)]) == 0
        assert png.stat().st_size > 10_000
    assert r["untouched"] and r["files"] == ["sub", "trace-gpipe.json"]  # no timeline: nothing written


@pytest.mark.parametrize("kind,M,v", [("gpipe", 3, 1), ("interleaved", 4, 2)])
def test_timeline_on_loopback_ranks(tmp_path, capsys, kind, M, v):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((32, 12)).astype("float32"), rng.integers(0, 4, 32)
    models = [zoo.mlp(0) for _ in range(2)]
    for m in models:
        m.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = str(tmp_path / "trace.json")
    loopback.run(
        2,
        lambda comm: hf.fit(
            models[comm.Get_rank()],
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            num_partitions=2,
            num_microbatches=M,
            schedule=kind,
            timeline=path,
            comm=comm,
        ),
    )
    with open(path) as f:
        trace = json.load(f)
    check_trace(trace, kind, 2, 1, M, 4, 0, v)
    assert cli.main(["timeline", path, "--steps", "1:2"]) == 0
    table = capsys.readouterr().out
    assert "training steps 1-2" in table and "compute" in table
    assert cli.main(["timeline", path, "--steps", "4"]) == 2  # the trace has steps 0..3
    assert "training steps 0..3" in capsys.readouterr().err
    start, end, *_ = gantt.window(trace, 1, 2)
    for rank, share in gantt.shares(trace, start, end).items():
        assert sum(share.values()) == pytest.approx(1.0) and share["forward"] + share["fused"] > 0, rank
