"""The hyparflow command: info under mpirun, run (launcher), train (the README's main job),
plan; launch-line building and config validation."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPTS, mpi_env, mpirun

from hyparflow import config
from hyparflow.errors import ConfigError
from hyparflow.launch import Launch


def hyparflow(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hyparflow", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=mpi_env(),
        cwd=ROOT,
        **kw,
    )


def test_version():
    out = hyparflow("--version")
    assert out.returncode == 0 and re.match(r"hyparflow \d+\.\d+", out.stdout)


@pytest.mark.mpi
def test_info_under_mpirun_reports_world_size_and_library():
    out = mpirun(2, [sys.executable, "-m", "hyparflow", "info"], timeout=120).stdout
    assert "world size: 2" in out
    assert re.search(r"MPI library: (Open MPI|MPICH)", out)
    assert "TF threads per rank: intra-op 1" in out  # 2 ranks share 2 cores


@pytest.mark.mpi
def test_run_trains_with_the_map_printed():
    out = hyparflow(
        "run",
        "-np",
        "4",
        "--partitions",
        "2",
        "--microbatches",
        "2",
        sys.executable,
        str(SCRIPTS / "user_script.py"),
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    text = out.stdout + out.stderr
    assert "rank map (P=2 x R=2, M=2" in text
    rows = re.findall(r"^\s+(\d)\s+\S+\s+\d+\s+\S+\s+(\d)\s+(\d)\s*$", text, re.M)
    assert sorted((int(a), int(b), int(c)) for a, b, c in rows[:4]) == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    acc = float(re.search(r"world 4 final accuracy ([\d.]+)", text).group(1))
    assert acc > 0.75


def test_run_dry_run_prints_the_launch_line():
    layout = ["--partitions", "2", "--schedule", "interleaved", "--virtual-stages", "3"]
    out = hyparflow("run", "--dry-run", "-np", "4", *layout, "python", "train.py", timeout=60)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert re.search(r"(mpirun|mpiexec|prterun)\S* -np 4", line)
    assert line.endswith("python train.py")
    for var in ("PARTITIONS", "SCHEDULE", "VIRTUAL_STAGES"):
        assert f"-x HYPARFLOW_{var}" in line


def test_run_exit_code_is_the_jobs():
    out = hyparflow("run", "-np", "2", sys.executable, "-c", "import sys; sys.exit(3)", timeout=120)
    assert out.returncode == 3, out.stderr


@pytest.mark.mpi
def test_train_quickstart_is_the_readme_main_job():
    readme = (ROOT / "README.md").read_text()
    assert "hyparflow train configs/quickstart.yaml" in readme.split("```bash")[1].splitlines()[1]
    out = hyparflow("train", "configs/quickstart.yaml", timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    acc = float(re.search(r"final test accuracy: ([\d.]+)", out.stdout).group(1))
    assert acc > 0.85


def test_plan_command_shows_stages():
    out = hyparflow("plan", "resnet20", "--partitions", "4", "--balance", "flops", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "in 4 stages" in out.stdout and len(re.findall(r"^\s+[0-3]\s+\d+\s", out.stdout, re.M)) == 4


def test_plan_command_bad_model_is_a_clear_error():
    out = hyparflow("plan", "resnet21", timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Unknown model 'resnet21': use one of" in out.stderr


# ---- launch lines (argument building only: no job runs) -----------------------------
def test_openmpi_line_as_root_with_hosts(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    argv = Launch(np=8, command=["python", "t.py"], hosts="a:4,b:4", settings={"HYPARFLOW_PARTITIONS": "4"}).argv(
        "/x/mpirun", "openmpi"
    )
    assert argv[:3] == ["/x/mpirun", "-np", "8"]
    assert (
        "--allow-run-as-root" in argv and ["--host", "a:4,b:4"] == argv[argv.index("--host") : argv.index("--host") + 2]
    )
    assert "mpi_yield_when_idle" in argv and argv[-2:] == ["python", "t.py"]


def test_mpich_line(monkeypatch):
    argv = Launch(np=2, command=["python", "t.py"], settings={"HYPARFLOW_PARTITIONS": "2"}).argv("/x/mpiexec", "mpich")
    assert argv[:3] == ["/x/mpiexec", "-n", "2"] and ["-genv", "HYPARFLOW_PARTITIONS", "2"] == argv[3:6]


def test_srun_inside_slurm_allocation(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    assert Launch(np=4, command=["python", "t.py"]).argv()[:5] == ["srun", "--mpi=pmix", "-n", "4", "python"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"np": 0, "command": ["x"]}, "at least 1"),
        ({"np": 2, "command": []}, "No command"),
        ({"np": 4, "command": ["x"], "hosts": "a:1,b:1"}, "offers 2 slots"),
        ({"np": 4, "command": ["x"], "hosts": "a:x"}, "host:slots"),
        ({"np": 4, "command": ["x"], "hosts": "a:4", "hostfile": "h"}, "not both"),
        ({"np": 4, "command": ["x"], "hostfile": "/nonexistent/hosts"}, "does not exist"),
        ({"np": 3, "command": ["x"], "settings": {"HYPARFLOW_PARTITIONS": "2"}}, "not a multiple of --partitions 2"),
    ],
)
def test_bad_launch_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Launch(**kwargs).argv("/x/mpirun", "openmpi")


# ---- configs ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = config.load(str(ROOT / "configs" / name))
    assert cfg["ranks"] % cfg["partitions"] == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: cnn\nepochz: 3\n", r"unknown settings \['epochz'\]"),
        ("model: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("batch_size: -4\n", "batch_size must be a positive integer"),
        ("ranks: 3\npartitions: 2\n", "not a multiple of partitions"),
    ],
)
def test_bad_configs(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(str(path))


def test_missing_config():
    with pytest.raises(ConfigError, match="does not exist"):
        config.load("/nonexistent.yaml")


def test_plan_command_for_a_users_module_function(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import keras\n"
        "def tiny():\n"
        "    x = inp = keras.Input((10,))\n"
        "    for _ in range(5):\n"
        "        x = keras.layers.Dense(8)(x)\n"
        "    return keras.Model(inp, keras.layers.Dense(2)(x))\n"
    )
    env = mpi_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    out = subprocess.run(
        [sys.executable, "-m", "hyparflow", "plan", "mymodels:tiny", "--partitions", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "6 layer calls in 3 stages" in out.stdout
    # the time plan traces one function per timed piece, on purpose: TensorFlow must not call it retracing
    assert "retracing" not in out.stderr
