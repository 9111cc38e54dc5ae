"""The shipped sbatch template under a real one-node SLURM cluster started on this machine
(munged + slurmctld + slurmd from Debian's packages, installed here if missing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from conftest import ROOT, mpi_env

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "libpmix2", "libpmix-dev"]


def _have_slurm() -> bool:
    return all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")) and os.path.exists(
        "/usr/lib/x86_64-linux-gnu/libpmix.so"
    )


def _install() -> str | None:
    """Install SLURM with apt; returns why it could not, or None."""
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is unavailable"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            return f"{' '.join(cmd)} failed: {proc.stderr[-500:]}"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not _have_slurm():
        why = _install()
        if why:
            if os.environ.get("CI"):
                pytest.fail(f"CI must run the SLURM tests: {why}")
            pytest.skip(why)
    state = tmp_path_factory.mktemp("slurm")
    script = ROOT / "launch" / "slurm" / "cluster.sh"
    proc = subprocess.run([str(script), "start", str(state)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + "".join(p.read_text() for p in state.glob("*.log"))
    env = mpi_env(SLURM_CONF=str(state / "slurm.conf"), PYTHON=sys_python())
    yield env, state
    subprocess.run([str(script), "stop", str(state)], timeout=60)


def sys_python() -> str:
    import sys

    return sys.executable


@pytest.mark.slurm
def test_hybrid_sbatch_template_trains_on_a_2x2_grid(slurm, tmp_path):
    env, _ = slurm
    log = tmp_path / "job.out"
    proc = subprocess.run(
        ["sbatch", "--wait", f"--output={log}", str(ROOT / "launch" / "slurm" / "hybrid.sbatch")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + text[-4000:]
    assert "rank map (P=2 x R=2, M=4" in text
    rows = re.findall(r"^\s+(\d)\s+\S+\s+\d+\s+\S+\s+(\d)\s+(\d)\s*$", text, re.M)[:4]
    assert sorted((int(r), int(rep), int(st)) for r, rep, st in rows) == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert float(re.search(r"final test accuracy: ([\d.]+)", text).group(1)) > 0.85


@pytest.mark.slurm
def test_srun_gives_a_real_world_of_4(slurm):
    env, _ = slurm
    code = "from mpi4py import MPI; print('size', MPI.COMM_WORLD.Get_size())"
    proc = subprocess.run(
        ["srun", "--mpi=pmix", "-n", "4", sys_python(), "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split().count("4") == 4  # not four worlds of 1 (what --mpi=none gives)


@pytest.mark.slurm
def test_hyparflow_run_uses_srun_inside_an_allocation(slurm):
    env, _ = slurm
    code = "from mpi4py import MPI; print('size', MPI.COMM_WORLD.Get_size())"
    cmd = (
        f"{sys_python()} -m hyparflow run --dry-run -np 4 python x.py; "
        f'{sys_python()} -m hyparflow run -np 4 {sys_python()} -c "{code}"'
    )
    proc = subprocess.run(
        ["salloc", "-n", "4", "bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("srun --mpi=pmix -n 4 python x.py")
    assert proc.stdout.count("size 4") == 4
