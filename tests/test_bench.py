"""`hyparflow bench` end to end with tiny settings: every variant runs, and the report has
the ratios, per-stage timers, bubble figures, bandwidths, JSON and chart (no timing asserts)."""

from __future__ import annotations

import json

import pytest
from test_cli import hyparflow


@pytest.mark.mpi
def test_bench_reports_every_variant(tmp_path):
    out = hyparflow(
        "bench", "--model", "mlp", "--batch-size", "32", "--steps", "2", "--windows", "2", "--warmup", "1", "--repeats", "1",
        "--configs", "1x1x1,2x1x2:gpipe", "--comm-sizes", "1", "--out", str(tmp_path), timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[0].startswith("keras model.fit") and names[1].startswith("data-parallel baseline")
    assert names[2:] == ["hyparflow P=1 R=1 M=1 1f1b", "hyparflow P=2 R=1 M=2 gpipe"]
    assert report["rows"][1]["backend"] in ("horovod", "mpi4py")
    for row in report["rows"]:
        assert row["throughput"] > 0 and len(row["windows"]) == 2 and row["vs_keras"] > 0 and row["peak_mb"] > 0
    pipe = report["rows"][3]
    assert pipe["bubble_bound"] == pytest.approx(1 / 3)
    assert sorted(s["stage"] for s in pipe["stages"]) == [0, 1]
    assert all(s["compute"] > 0 and s["wall"] > 0 for s in pipe["stages"])
    assert set(report["comm"]["1.0"]) == {"sendrecv_raw_GBs", "sendrecv_hyparflow_GBs", "allreduce_raw_GBs", "allreduce_hyparflow_GBs"}
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "vs keras" in out.stdout and "send/recv raw" in out.stdout
