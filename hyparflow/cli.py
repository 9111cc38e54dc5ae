"""The `hyparflow` command: info, plan, run (a launcher like horovodrun), train (a YAML job),
bench (throughput against plain Keras and a data-parallel baseline), timeline (a trace drawn
as a Gantt chart)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import hyparflow
from hyparflow.errors import ConfigError
from hyparflow.schedule import SCHEDULES


def _info(_args) -> int:
    import platform

    import keras
    import mpi4py
    import tensorflow as tf
    from mpi4py import MPI

    from hyparflow.placement import node_cores

    world = MPI.COMM_WORLD
    if world.Get_rank() == 0:
        print(f"hyparflow {hyparflow.__version__}")
        print(
            f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, mpi4py "
            f"{mpi4py.__version__}"
        )
        print(f"MPI library: {MPI.Get_library_version().strip().splitlines()[0]}")
        print(f"MPI standard: {'.'.join(map(str, MPI.Get_version()))}")
        print(f"world size: {world.Get_size()}")
        print(f"cores per node: {os.cpu_count()} (this rank may use {node_cores()})")
        print(
            f"TF threads per rank: intra-op {os.environ.get('TF_NUM_INTRAOP_THREADS')}, inter-op "
            f"{os.environ.get('TF_NUM_INTEROP_THREADS')}"
        )
    return 0


def _plan(args) -> int:
    from hyparflow import models
    from hyparflow.partition import plan

    model = models.build(args.model, args.input_shape, args.classes)
    balance = args.balance
    if balance and "," in balance:
        items = balance.split(",")
        balance = [int(b) for b in items] if all(b.strip().isdigit() for b in items) else items
    print(plan(model, args.partitions, balance=balance))
    return 0


def _settings(args) -> dict[str, str]:
    """The run flags given, as the HYPARFLOW_* variables the ranks read (settings.LAYOUT_ENV)."""
    from hyparflow.settings import LAYOUT_ENV

    flags = {
        "num_partitions": "partitions",
        "num_replicas": "replicas",
        "num_microbatches": "microbatches",
        "schedule": "schedule",
        "virtual_stages": "virtual_stages",
        "recompute": "recompute",
    }
    values = {LAYOUT_ENV[key][0]: getattr(args, flag, None) for key, flag in flags.items()}
    return {var: str(value) for var, value in values.items() if value is not None}


def _run(args) -> int:
    from hyparflow.launch import Launch

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    job = Launch(
        np=args.np,
        command=command,
        hosts=args.hosts,
        hostfile=args.hostfile,
        settings=_settings(args),
        bind=args.bind,
        extra=args.launcher_args or (),
    )
    if args.dry_run:
        print(" ".join(job.argv()))
        return 0
    return job.run()


def _train(args) -> int:
    from hyparflow import config
    from hyparflow.launch import Launch, in_mpi_job

    cfg = config.load(args.config)
    ranks = args.np or cfg["ranks"]
    if ranks > 1 and not in_mpi_job():
        job = Launch(
            np=ranks,
            command=[sys.executable, "-m", "hyparflow", "train", args.config],
            settings={"HYPARFLOW_PARTITIONS": str(cfg["partitions"])},
        )
        return job.run()
    from hyparflow.jobs import train_from_config

    train_from_config(cfg)
    return 0


def _timeline(args) -> int:
    from hyparflow.gantt import main as gantt_main

    return gantt_main(args)


def _bench(args) -> int:
    from hyparflow.bench import main as bench_main

    return bench_main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyparflow", description="Hybrid-parallel training of Keras models over MPI.")
    p.add_argument("--version", action="version", version=f"hyparflow {hyparflow.__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("info", help="versions, MPI library, world size, cores").set_defaults(fn=_info)

    pl = sub.add_parser("plan", help="show the partition plan of a model")
    pl.add_argument("model", help="built-in name (resnet20, resnet110, vgg16, mlp, cnn, ...) or module:function")
    pl.add_argument("--partitions", "-p", type=int, default=2)
    pl.add_argument("--input-shape", type=lambda s: tuple(int(d) for d in s.split(",")), default=(32, 32, 3))
    pl.add_argument("--classes", type=int, default=10)
    pl.add_argument("--balance", default=None, help="time | flops | params | counts 'n1,n2,..' | cut-after names 'a,b'")
    pl.set_defaults(fn=_plan)

    r = sub.add_parser("run", help="launch a command on N ranks with mpirun (or srun inside SLURM)")
    r.add_argument("-np", "--np", type=int, required=True, help="number of ranks")
    r.add_argument("--hosts", help="host:slots,host:slots")
    r.add_argument("--hostfile")
    r.add_argument("--partitions", type=int)
    r.add_argument("--replicas", type=int)
    r.add_argument("--microbatches", type=int)
    r.add_argument("--schedule", choices=SCHEDULES)
    r.add_argument("--virtual-stages", type=int, help="stages a rank holds under --schedule interleaved (default 2)")
    r.add_argument(
        "--recompute", action="store_true", default=None, help="recompute each stage's forward in its backward"
    )
    r.add_argument("--bind", action="store_true", help="bind each rank to its share of cores")
    r.add_argument("--dry-run", action="store_true", help="print the launch command and exit")
    r.add_argument("--launcher-args", nargs="*", help="extra arguments for mpirun/srun")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(fn=_run)

    t = sub.add_parser("train", help="run a training job described by a YAML config")
    t.add_argument("config")
    t.add_argument("-np", "--np", type=int, default=None, help="ranks (default: the config's 'ranks')")
    t.set_defaults(fn=_train)

    from hyparflow.bench import add_arguments

    b = sub.add_parser(
        "bench", help="throughput: plain Keras vs data-parallel baseline vs hyparflow grids, and MPI bandwidth"
    )
    add_arguments(b)
    b.set_defaults(fn=_bench)

    from hyparflow.gantt import add_arguments as timeline_arguments

    tl = sub.add_parser(
        "timeline", help="draw a fit(timeline=...) trace as a Gantt chart; print where each rank's time went"
    )
    timeline_arguments(tl)
    tl.set_defaults(fn=_timeline)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"hyparflow: error: {e}", file=sys.stderr)
        return 2
