"""A real multi-host job on one machine: hosts are network namespaces with their own
addresses and hostnames, mpirun reaches them through a launch agent instead of ssh, and
ranks talk over TCP (launch/netns-cluster.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPTS, mpi_env

CLUSTER = str(ROOT / "launch" / "netns-cluster.sh")


@pytest.fixture(scope="module")
def hosts():
    why = None
    if os.geteuid() != 0:
        why = "network namespaces need root"
    elif not shutil.which("ip") or not shutil.which("unshare"):
        why = "iproute2 / util-linux are not installed"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-node tests: {why}")
        pytest.skip(why)
    subprocess.run([CLUSTER, "down", "3"], capture_output=True)
    up = subprocess.run([CLUSTER, "up", "2"], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    env = mpi_env()
    for name, value in re.findall(r"(\w+)=((?:\\ |\S)+)", up.stdout):
        env[name] = value.replace("\\ ", " ")
    yield env
    subprocess.run([CLUSTER, "down", "2"], capture_output=True, timeout=60)


def on_host1(env, *cmd, timeout=300):
    return subprocess.run(
        [CLUSTER, "exec", "hfnode1", *cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


@pytest.mark.mpi
def test_each_namespace_is_a_node(hosts):
    code = (
        "from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
        "print('R', c.rank, socket.gethostname(), c.Split_type(MPI.COMM_TYPE_SHARED).size)"
    )
    proc = on_host1(
        hosts,
        sys.executable,
        "-m",
        "hyparflow",
        "run",
        "-np",
        "4",
        "--hosts",
        "hfnode1:2,hfnode2:2",
        sys.executable,
        "-c",
        code,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted(re.findall(r"^R (\d) (\S+) (\d)$", proc.stdout, re.M))
    assert rows == [("0", "hfnode1", "2"), ("1", "hfnode1", "2"), ("2", "hfnode2", "2"), ("3", "hfnode2", "2")]


@pytest.mark.mpi
def test_hybrid_2x2_across_two_hosts_keeps_each_pipeline_on_one_host(hosts, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("hfnode1 slots=2\nhfnode2 slots=2\n")
    proc = on_host1(
        hosts,
        sys.executable,
        "-m",
        "hyparflow",
        "run",
        "-np",
        "4",
        "--hostfile",
        str(hostfile),
        "--partitions",
        "2",
        sys.executable,
        str(SCRIPTS / "user_script.py"),
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    rows = re.findall(r"^\s+(\d)\s+(hfnode\d)\s+\d+\s+\S+\s+(\d)\s+(\d)\s*$", text, re.M)
    assert len(rows) == 4
    host_of_replica = {}
    for _, host, replica, _ in rows:
        host_of_replica.setdefault(replica, set()).add(host)
    assert host_of_replica == {"0": {"hfnode1"}, "1": {"hfnode2"}}
    assert float(re.search(r"world 4 final accuracy ([\d.]+)", text).group(1)) > 0.75
