"""`hyparflow bench` end to end with tiny settings: every variant runs, and the report has
the ratios, per-stage timers, bubble figures, whole-call timings (throughput by epochs with the
progress bar off and on, a second fit's start-up), bandwidths, JSON, chart and the comparison
with a previous run (no timing asserts)."""

from __future__ import annotations

import json
import os

import pytest
from test_cli import hyparflow

CALL_TIMINGS = ("throughput_epochs", "throughput_verbose", "second_fit_startup_s", "second_fit_prestep_s")


@pytest.mark.mpi
def test_bench_reports_every_variant(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model": "mlp", "batch_size": 32, "rows": [
        {"name": "keras model.fit (1 process)", "throughput": 12345.0, "second_fit_startup_s": 9.5},
        {"name": "hyparflow P=4 R=1 M=4 1f1b", "throughput": 1.0},
    ]}))  # fmt: skip
    out = hyparflow(
        "bench", "--model", "mlp", "--batch-size", "32", "--steps", "2", "--windows", "2", "--warmup", "1",
        "--repeats", "1",
        "--configs", "1x2x1,2x1x2:gpipe", "--comm-sizes", "1", "--out", str(tmp_path), "--compare", str(old),
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[0].startswith("keras model.fit") and names[1].startswith("data-parallel baseline")
    # Keras again as one rank of each 2-rank grid: with its threads, on its replica's share of the batch
    cores = os.cpu_count() or 1
    share = max(1, cores // 2)
    like = sorted({(share, 16), (share, 32)} - {(cores, 32)})
    thread_rows = [
        f"keras model.fit (1 process) with {t} thread{'s' * (t > 1)}" + (f", batch {b}" if b != 32 else "")
        for t, b in like
    ]
    assert names[2:] == [*thread_rows, "hyparflow P=1 R=2 M=1 1f1b", "hyparflow P=2 R=1 M=2 gpipe"]
    assert report["rows"][1]["backend"] in ("horovod", "mpi4py")
    for row in report["rows"]:
        assert row["throughput"] > 0 and len(row["windows"]) == 2 and row["vs_keras"] > 0 and row["peak_mb"] > 0
        assert row["cpu_s_per_step"] > 0
    keras_row, dp_row, *rest = report["rows"]
    reference = dict(zip(like, rest)) | {(cores, 32): keras_row}
    hf_rows = rest[len(thread_rows) :]
    for row in [keras_row, *rest]:  # Keras and hyparflow timed as whole calls too
        assert all(row[k] > 0 for k in CALL_TIMINGS), row
        assert row["second_fit_prestep_s"] < row["second_fit_startup_s"], "the pre-step time is part of it"
        assert row["progress_bar_cost"] == pytest.approx(1 - row["throughput_verbose"] / row["throughput_epochs"])
    assert not any(k in dp_row for k in CALL_TIMINGS)  # the hand-written DP loop has no fit calls
    for row in hf_rows:  # each hyparflow row's bar cost is set against Keras's
        bar_cost = row["progress_bar_cost"] - keras_row["progress_bar_cost"]
        assert row["progress_bar_cost_vs_keras"] == pytest.approx(bar_cost)
    # Data parallelism's ideal: two Kerases side by side, each on half the batch with one rank's threads
    dp, pipe = hf_rows
    half = reference[share, 16]
    assert dp["ideal_step_s"] == pytest.approx(16 / half["throughput"]) and dp["ideal_batch"] == 16
    assert dp["efficiency_vs_bubble_bound"] == pytest.approx(16 / half["throughput"] * dp["throughput"] / 32)
    assert "bubble_measured" not in dp and "efficiency_vs_bubble_bound_all_cores" not in dp
    slowest = max(s["compute_cpu"] for s in dp["stages"]) / (2 * 2)  # per timed step (2 windows of 2 steps)
    assert dp["work_efficiency"] == pytest.approx(half["cpu_s_per_step"] / slowest)
    assert pipe["bubble_bound"] == pytest.approx(1 / 3)
    whole = reference[share, 32]
    ideal = 32 / whole["throughput"] / 2 * 3 / 2  # Keras's step with one rank's threads / P x (M + P - 1) / M
    assert pipe["ideal_step_s"] == pytest.approx(ideal) and pipe["ideal_threads"] == share
    assert pipe["efficiency_vs_bubble_bound"] == pytest.approx(ideal * pipe["throughput"] / 32)
    assert all(0 < s["compute_cpu"] for s in pipe["stages"])
    slowest = max(s["compute_cpu"] for s in pipe["stages"]) / (2 * 2)  # per timed step (2 windows of 2 steps)
    assert pipe["work_efficiency"] == pytest.approx(whole["cpu_s_per_step"] / 2 / slowest)
    assert sorted(s["stage"] for s in pipe["stages"]) == [0, 1]
    assert all(s["compute"] > 0 and s["wall"] > 0 for s in pipe["stages"])
    assert set(report["comm"]["1.0"]) == {
        "sendrecv_raw_GBs",
        "sendrecv_hyparflow_GBs",
        "allreduce_raw_GBs",
        "allreduce_hyparflow_GBs",
    }
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "vs keras" in out.stdout and "send/recv raw" in out.stdout
    assert "verbose=1" in out.stdout and "2nd fit start-up <= 1 s" in out.stdout  # the whole-call table and its targets
    # --compare: the previous run's numbers beside the new ones, and variants it lacked named
    assert f"compared with {old}" in out.stdout
    lines = out.stdout.splitlines()
    keras_lines = [line.split() for line in lines if line.startswith("keras model.fit (1 process)")]
    assert ["throughput", "1.23e+04"] in [words[4:6] for words in keras_lines]
    assert ["second_fit_startup_s", "9.5"] in [words[4:6] for words in keras_lines]
    assert any(line.startswith("hyparflow P=2 R=1 M=2 gpipe") and line.endswith(f"(not in {old})") for line in lines)


def test_configs_parse_grids_schedules_and_settings():
    from hyparflow.bench import _parse_configs
    from hyparflow.errors import ConfigError

    plain, timed, interleaved, four = _parse_configs(
        "2x1x8,2x1x8:gpipe+HYPARFLOW_TIMELINE=t.json,2x1x8:interleaved,2x1x8:interleaved+HYPARFLOW_VIRTUAL_STAGES=4"
    )
    assert plain == dict(name="hyparflow P=2 R=1 M=8 1f1b", P=2, R=1, M=8, v=1, schedule="1f1b", env={})
    assert timed["name"] == "hyparflow P=2 R=1 M=8 gpipe timeline=t.json"
    assert timed["env"] == {"HYPARFLOW_TIMELINE": "t.json"} and timed["schedule"] == "gpipe"
    assert (interleaved["schedule"], interleaved["v"], four["v"]) == ("interleaved", 2, 4)
    with pytest.raises(ConfigError, match="expected PxRxM"):
        _parse_configs("2x1")
    with pytest.raises(ConfigError, match=r"\+HYPARFLOW_NAME=value"):
        _parse_configs("2x1x8+PATH=/tmp")
