"""Shared test helpers: launching real MPI jobs with a timeout, and the test's paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "mpi"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def mpi_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("OMPI_MCA_btl", "^ofi")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def mpirun(
    np: int, args: list[str], timeout: float = 300, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `args` on `np` real MPI ranks (mpirun beside this Python unless HYPARFLOW_MPIRUN),
    killing the job after `timeout` seconds; on failure every rank's output is shown."""
    from hyparflow.launch import Launch

    argv = Launch(np=np, command=args).argv()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env or mpi_env(), start_new_session=True
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(
            f"MPI job hung: {' '.join(argv)} did not finish in {timeout} s\n--- stdout\n{out[-6000:]}\n--- "
            f"stderr\n{err[-6000:]}"
        )
    if check and proc.returncode != 0:
        pytest.fail(
            f"MPI job failed (exit {proc.returncode}): {' '.join(argv)}\n--- stdout\n{proc.stdout[-8000:]}\n--- "
            f"stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def run_script(np: int, script: str, *args: str, timeout: float = 300, tmp: Path, env=None) -> dict:
    """Run tests/mpi/<script> on `np` ranks; it writes its results as JSON to the path given."""
    out = tmp / f"{Path(script).stem}-{np}.json"
    mpirun(np, [sys.executable, str(SCRIPTS / script), str(out), *args], timeout=timeout, env=env)
    return json.loads(out.read_text())


@pytest.fixture
def float64():
    """Layers made meanwhile compute and hold float64 (Keras caches its global dtype policy):
    training-equivalence tests of deep or chaotic models run where float rounding cannot
    masquerade as, or hide, a difference."""
    import keras

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)
