"""Start-up cannot hang, and sessions leave nothing behind (real mpirun, 4 ranks).

A rank that fails, dies or ends before reaching hyparflow ends the whole job promptly with
that rank named; node-local checkpoint folders cannot make ranks resume at different
epochs; 100 consecutive fits free every communicator they create and keep memory flat."""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import SCRIPTS, mpi_env, mpirun


def launch(mode: str, tmp_path, np: int = 4, timeout: float = 120, **env: str):
    out, stamp = tmp_path / f"{mode}.json", tmp_path / "stamp"
    proc = mpirun(
        np,
        [sys.executable, str(SCRIPTS / "startup.py"), mode, str(out)],
        timeout=timeout,
        env=mpi_env(HYPARFLOW_FAULT_STAMP=str(stamp), **env),
        check=False,
    )
    after = time.time() - float(stamp.read_text()) if stamp.exists() else None
    return proc, proc.stdout + proc.stderr, after, out


@pytest.mark.mpi
def test_ranks_raising_before_fit_end_the_job_naming_the_rank(tmp_path):
    proc, text, after, _ = launch("raise", tmp_path)
    assert proc.returncode != 0, text[-3000:]
    assert after is not None and after < 30, f"{after} s from the exception to the job's end"
    # The excepthook installed by `import hyparflow` names the rank and the original error.
    assert "ended with an uncaught RuntimeError" in text and "the model failed to build on rank" in text, text[-3000:]


@pytest.mark.mpi
def test_rank_ending_normally_without_fit_ends_the_job_naming_it(tmp_path):
    proc, text, after, _ = launch("exit", tmp_path)
    assert proc.returncode != 0, text[-3000:]
    assert after is not None and after < 30, f"{after} s from rank 3's exit to the job's end"
    assert "rank 3 ended its script without reaching the start of a hyparflow call" in text, text[-3000:]


@pytest.mark.mpi
def test_rank_killed_before_fit_ends_the_job(tmp_path):
    proc, text, after, _ = launch("kill", tmp_path)
    assert proc.returncode != 0, text[-3000:]
    assert after is not None and after < 30, f"{after} s from the kill to the job's end"


@pytest.mark.mpi
def test_late_rank_is_named_after_the_start_timeout(tmp_path):
    proc, text, after, _ = launch("late", tmp_path, HYPARFLOW_START_TIMEOUT="3")
    assert proc.returncode != 0, text[-3000:]
    assert after is not None and after < 30, f"{after} s from rank 3's delay to the job's end"
    assert "ranks [3] did not reach the start of a hyparflow call within 3 s of rank 0" in text, text[-3000:]


@pytest.mark.mpi
def test_node_local_checkpoint_folders_resume_at_the_same_epoch(tmp_path):
    proc, text, _, out = launch("local", tmp_path, np=2)
    assert proc.returncode == 0, text[-3000:]
    # Rank 0 decides (its newest is epoch 1); rank 1's newer epoch-2 file is not used.
    assert json.loads(out.read_text())["epochs"] == [[1, 2], [1, 2]]


@pytest.mark.mpi
def test_hundred_fits_reuse_one_session_keep_memory_flat_and_free_closed_sessions(tmp_path):
    proc, text, _, out = launch("repeat", tmp_path, np=2, timeout=600)
    assert proc.returncode == 0, text[-3000:]
    for r, result in enumerate(json.loads(out.read_text())):
        assert result["reused"] == 2, f"rank {r}: 100 fits with one layout opened {result['reused'] // 2} sessions"
        assert result["groups"] == 2 + 2 * 20, f"rank {r}: two groups per session"
        assert result["leaked"] == 0, f"rank {r}: {result['leaked']} communicators of closed sessions not freed"
        growth = result["rss_mb"][-1] - result["rss_mb"][9]
        assert growth < 20, f"rank {r}: peak RSS grew {growth:.0f} MB over fits 10-100"
