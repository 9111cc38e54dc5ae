"""`hyparflow bench`: throughput of plain Keras, a Horovod-style data-parallel loop and
hyparflow grids, measured in one invocation (alternating, to cancel machine drift), plus
communication microbenchmarks of raw mpi4py against hyparflow's own paths.

The driver launches every variant as its own job (`python -m hyparflow.bench worker ...`
under `hyparflow run`); workers print one JSON line that the driver collects.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import keras

from hyparflow import inputbench, membench
from hyparflow.errors import ConfigError
from hyparflow.launch import job_result, report
from hyparflow.placement import node_cores, split_cores

KERAS = "keras model.fit (1 process)"


# ---- workers (run inside the launched jobs) ------------------------------------------
def _model_and_data(args):
    import numpy as np

    from hyparflow import models

    keras.utils.set_random_seed(0)
    model = models.build(args.model, (32, 32, 3), 10)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    n = args.batch_size * (args.warmup + args.windows * args.steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    return model, x, y


class _StepClock(keras.callbacks.Callback):
    """Times windows of `steps` batches after `warmup` batches (`marks`; `cpu_marks`: this
    process's CPU seconds at the same moments)."""

    def __init__(self, warmup: int, steps: int):
        super().__init__()
        self.warmup, self.steps = warmup, steps
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []
        self.batch = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batch += 1
        if self.batch >= self.warmup and (self.batch - self.warmup) % self.steps == 0:
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())


def _windows(marks: list[float], steps: int, batch_size: int) -> list[float]:
    return [steps * batch_size / (b - a) for a, b in zip(marks, marks[1:])]


def _cpu_per_step(cpu_marks: list[float], total) -> float:
    """CPU seconds per timed step, summed over the job's ranks by `total`: the work a step
    costs whatever share of the cores other processes leave it."""
    return total((cpu_marks[-1] - cpu_marks[0]) / max(len(cpu_marks) - 1, 1)) if cpu_marks else float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fit_calls(fit, args, slowest, first_callbacks=(), total=lambda seconds: seconds) -> dict:
    """The same fit calls on one model, for plain Keras and hyparflow alike: the first, timed in
    per-step windows after warm-up; a second, stopped after its first batch, timing its start-up
    (from the call to the end of that batch: what reusing the first call's work costs; and, of it,
    the time before that batch begins, which the machine's step time does not swamp); then two
    timed as whole calls of `--epochs` epochs, with the progress bar off (verbose=0) and on
    (verbose=1). `fit(epochs, verbose, callbacks)` makes one call; `slowest` takes the maximum of
    a duration over the job's ranks, `total` their sum."""
    clock = _StepClock(args.warmup, args.steps)
    fit(epochs=1, verbose=0, callbacks=[clock, *first_callbacks])
    first = _FirstBatch()
    t0 = time.perf_counter()
    fit(epochs=1, verbose=0, callbacks=[first])
    startup, prestep = slowest(first.at - t0), slowest(first.begin - t0)
    samples = args.epochs * args.batch_size * (args.warmup + args.windows * args.steps)
    by_epochs = []
    for verbose in (0, 1):
        t0 = time.perf_counter()
        fit(epochs=args.epochs, verbose=verbose, callbacks=[])
        by_epochs.append(samples / slowest(time.perf_counter() - t0))
    return {
        "throughput": _windows(clock.marks, args.steps, args.batch_size),
        "cpu_s_per_step": [_cpu_per_step(clock.cpu_marks, total) / args.steps],
        "second_fit_startup_s": [startup],
        "second_fit_prestep_s": [prestep],
        "throughput_epochs": [by_epochs[0]],
        "throughput_verbose": [by_epochs[1]],
    }


class _FirstBatch(keras.callbacks.Callback):
    """Notes when the first batch of a call begins (`begin`) and ends (`at`), then stops the call."""

    at = begin = float("nan")

    def on_train_batch_begin(self, batch, logs=None):
        self.begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.at = time.perf_counter()
        self.model.stop_training = True


def worker_keras(args) -> dict:
    model, x, y = _model_and_data(args)

    def fit(**kw):
        return model.fit(x, y, batch_size=args.batch_size, shuffle=False, **kw)

    return {**_fit_calls(fit, args, slowest=lambda seconds: seconds), "peak_mb": [_peak_mb()]}


def worker_dp(args) -> dict:
    """The data-parallel baseline HyPar-Flow compared with: a Horovod
    DistributedGradientTape-style loop (compiled step, allreduce of the gradients after
    backward), over Horovod where it imports, else over mpi4py."""
    import numpy as np
    import tensorflow as tf
    from mpi4py import MPI

    try:
        import horovod.tensorflow as hvd

        hvd.init(comm=MPI.COMM_WORLD)
        backend = "horovod"
    except Exception:  # any failure to import or initialise: use the mpi4py loop
        hvd, backend = None, "mpi4py"
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    model, x, y = _model_and_data(args)
    opt, loss_fn = model.optimizer, model.loss
    variables = model.trainable_variables
    local = args.batch_size // size

    @tf.function
    def grads_of(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, variables)], 0)

    @tf.function
    def apply(flat):
        parts = tf.split(flat, [int(np.prod(v.shape)) for v in variables])
        opt.apply([tf.reshape(p, v.shape) for p, v in zip(parts, variables)], variables)

    marks, cpu_marks = [], []
    for step in range(args.warmup + args.windows * args.steps):
        lo = step * args.batch_size + rank * local
        g = grads_of(x[lo : lo + local], y[lo : lo + local])
        if hvd is not None:
            g = hvd.allreduce(g, op=hvd.Average)
        else:
            buf = g.numpy()
            out = np.empty_like(buf)
            world.Allreduce(buf, out, op=MPI.SUM)
            g = tf.convert_to_tensor(out / size)
        apply(g)
        if step + 1 >= args.warmup and (step + 1 - args.warmup) % args.steps == 0:
            world.Barrier()
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())
    return {
        "throughput": _windows(marks, args.steps, args.batch_size),
        "cpu_s_per_step": [_cpu_per_step(cpu_marks, lambda s: world.allreduce(s, op=MPI.SUM)) / args.steps],
        "backend": backend,
        "peak_mb": world.gather(_peak_mb(), root=0),
    }


def worker_hyparflow(args) -> dict:
    from mpi4py import MPI

    import hyparflow as hf

    world = MPI.COMM_WORLD
    model, x, y = _model_and_data(args)
    timers = _Timers(args.warmup)

    def fit(**kw):
        return hf.fit(
            model,
            x,
            y,
            batch_size=args.batch_size,
            shuffle=False,
            num_partitions=args.P,
            num_microbatches=args.M,
            schedule=args.schedule,
            balance=args.balance,
            **kw,
        )

    calls = _fit_calls(
        fit, args, lambda s: world.allreduce(s, op=MPI.MAX), [timers], lambda s: world.allreduce(s, op=MPI.SUM)
    )
    return {**calls, "peak_mb": world.gather(_peak_mb(), root=0), "stages": world.gather(timers.result, root=0)}


class _Timers(keras.callbacks.Callback):
    """Reads the executor's compute / wait / allreduce timers after warm-up (`result`)."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup, self.batch = warmup, 0
        self.start: tuple[float, dict[str, float]] = (0.0, {})
        self.result: dict[str, Any] = {}

    def on_train_batch_end(self, batch, logs=None):
        self.batch += 1
        if self.batch == self.warmup:
            self.start = (time.perf_counter(), dict(self.params["hyparflow"]["timers"]))

    def on_train_end(self, logs=None):
        info = self.params["hyparflow"]
        t0, before = self.start
        self.result = {k: info["timers"][k] - before[k] for k in info["timers"]}
        self.result.update(wall=time.perf_counter() - t0, stage=info["stage"], replica=info["replica"])


def worker_comm(args) -> dict:
    """Bandwidth of raw mpi4py Send/Recv and Allreduce vs hyparflow's activation path
    (TF tensor -> raw buffer -> Isend/Irecv -> TF tensor) and gradient allreduce path."""
    import numpy as np
    import tensorflow as tf
    from mpi4py import MPI

    from hyparflow.transport import Transport, aligned_empty, as_bytes, to_numpy, to_tensor

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    net = Transport(world)
    net.form_grid([(0, 0), (0, 1)], 2, 1)  # one replica of two stages: pipe = the world

    def raw_pingpong(raw, recv, tensor):
        if rank == 0:
            world.Send(raw, dest=1)
            world.Recv(recv, source=1)
        else:
            world.Recv(recv, source=0)
            world.Send(raw, dest=0)

    def hf_pingpong(raw, recv, tensor):
        """The activation path: TF tensor -> raw buffer -> Isend ... Irecv -> aligned buffer -> TF tensor."""
        buf = aligned_empty(raw.shape, raw.dtype)
        if rank == 0:
            net.wait([net.isend(to_numpy(tensor), 1, 0)], "bench", stage=1)
            net.wait([net.irecv(buf, 1, 1)], "bench", stage=1)
            to_tensor(buf)
        else:
            net.wait([net.irecv(buf, 0, 0)], "bench", stage=0)
            net.wait([net.isend(to_numpy(to_tensor(buf)), 0, 1)], "bench", stage=0)

    def raw_allreduce(raw, recv, tensor):
        world.Allreduce(raw, recv, op=MPI.SUM)

    def hf_allreduce(raw, recv, tensor):
        """The gradient path: accumulated gradients -> flat buffer -> Iallreduce into the
        reducer's reused aligned buffer -> TF tensor."""
        flat = to_numpy(tensor)
        net.allreduce(flat, recv, "bench")
        to_tensor(recv)

    out = {}
    for mb in args.sizes:
        n = int(mb * (1 << 20)) // 4
        bufs = (np.ones(n, np.float32), aligned_empty((n,), np.float32), tf.ones([n], tf.float32))
        reps = max(3, int(64 // max(mb, 1)))

        def timed(fn, bufs=bufs, reps=reps):
            fn(*bufs)
            world.Barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(*bufs)
            return (time.perf_counter() - t0) / reps

        size_bytes = as_bytes(bufs[0]).nbytes
        out[str(mb)] = {
            "sendrecv_raw_GBs": 2 * size_bytes / timed(raw_pingpong) / 1e9,
            "sendrecv_hyparflow_GBs": 2 * size_bytes / timed(hf_pingpong) / 1e9,
            "allreduce_raw_GBs": size_bytes / timed(raw_allreduce) / 1e9,
            "allreduce_hyparflow_GBs": size_bytes / timed(hf_allreduce) / 1e9,
        }
    return out


WORKERS = {"keras": worker_keras, "dp": worker_dp, "hyparflow": worker_hyparflow, "comm": worker_comm}


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=sorted(WORKERS))
    _common(p)
    p.add_argument("--P", type=int, default=1)
    p.add_argument("--M", type=int, default=1)
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--sizes", type=float, nargs="*", default=[1, 4, 16, 64])
    args = p.parse_args(argv)
    result = WORKERS[args.kind](args)
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        report(result)
    return 0


# ---- the driver --------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet20", help="a built-in model (resnet20, resnet56, ...)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (tracing, caches)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of each fit call timed as a whole")
    p.add_argument(
        "--balance", default=None, help="partitioner cost model (default: hyparflow's: time, or flops for big models)"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--configs",
        default="1x1x1,1x2x1,2x1x8",
        help="hyparflow grids PxRxM[:schedule][+HYPARFLOW_X=value...], comma-separated",
    )
    p.add_argument("--dp-ranks", type=int, default=2, help="ranks of the data-parallel baseline")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds over all variants")
    p.add_argument(
        "--comm-sizes", default="1,4,16,64", help="MB sizes for the communication microbenchmarks ('' to skip)"
    )
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    p.add_argument(
        "--compare",
        default=None,
        metavar="OLD_JSON",
        help="a previous run's bench.json to print the new numbers against",
    )
    membench.add_arguments(p)
    inputbench.add_arguments(p)


def _parse_configs(text: str) -> list[dict]:
    out = []
    for item in filter(None, text.split(",")):
        spec, *settings = item.split("+")
        grid, _, schedule = spec.partition(":")
        env = dict(kv.partition("=")[::2] for kv in settings)
        try:
            P, R, M = (int(v) for v in grid.lower().split("x"))
        except ValueError:
            raise ConfigError(
                f"--configs item {item!r}: expected PxRxM[:schedule][+VAR=value...], e.g. 2x1x8, 2x1x8:gpipe or "
                "2x1x8+HYPARFLOW_TIMELINE=t.json"
            ) from None
        if not all(k.startswith("HYPARFLOW_") and v for k, v in env.items()):
            raise ConfigError(f"--configs item {item!r}: settings must read +HYPARFLOW_NAME=value")
        suffix = "".join(f" {k[len('HYPARFLOW_') :].lower()}={v}" for k, v in env.items())
        schedule = schedule or "1f1b"
        name = f"hyparflow P={P} R={R} M={M} {schedule}{suffix}"
        v = int(env.get("HYPARFLOW_VIRTUAL_STAGES", 2 if schedule == "interleaved" else 1))
        out.append({"name": name, "P": P, "R": R, "M": M, "v": v, "schedule": schedule, "env": env})
    return out


def _run(np_: int, kind: str, args, extra: list[str], env: dict[str, str] | None = None, batch: int = 0) -> dict:
    cmd = [sys.executable, "-m", "hyparflow.bench", kind, "--model", args.model,
           "--batch-size", str(batch or args.batch_size),
           "--steps", str(args.steps), "--windows", str(args.windows), "--warmup", str(args.warmup),
           "--epochs", str(args.epochs),
           *(["--balance", args.balance] if args.balance else []), *extra]  # fmt: skip
    return job_result(cmd, np_, env)


def _rank_threads(ranks: int) -> int:
    """Threads each of `ranks` ranks on this node gets (placement.configure_threads's share)."""
    return len(split_cores(node_cores(), ranks, 0))


def _keras_like_a_rank(threads: int, batch: int, args) -> dict[str, Any]:
    """Plain Keras in one process restricted to `threads` threads, on `batch` samples a step:
    what one rank of a grid gets (its replica's share of the global batch), so the grid's
    ideal compares like with like."""
    env = {"TF_NUM_INTRAOP_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1"}
    name = f"{KERAS} with {threads} thread{'s' * (threads > 1)}" + (
        f", batch {batch}" if batch != args.batch_size else ""
    )
    return {"name": name, "kind": "keras", "np": 1, "extra": [], "threads": threads, "batch": batch,
            "env": {**env, "HYPARFLOW_AUTO_THREADS": ""}}  # fmt: skip


def _like_a_rank(c: dict[str, Any], args) -> tuple[int, int]:
    """(threads, samples a step) of one rank of grid `c`: its Keras reference."""
    return _rank_threads(c["P"] * c["R"]), max(args.batch_size // c["R"], 1)


def main(args) -> int:
    if args.memory:
        return membench.main(args)
    if args.input:
        return inputbench.main(args)
    variants: list[dict[str, Any]] = [{"name": KERAS, "kind": "keras", "np": 1, "extra": []}]
    variants.append(
        {"name": f"data-parallel baseline ({args.dp_ranks} ranks)", "kind": "dp", "np": args.dp_ranks, "extra": []}
    )
    configs = _parse_configs(args.configs)
    for threads, batch in sorted({_like_a_rank(c, args) for c in configs} - {(_rank_threads(1), args.batch_size)}):
        variants.append(_keras_like_a_rank(threads, batch, args))
    for c in configs:
        extra = ["--P", str(c["P"]), "--M", str(c["M"]), "--schedule", c["schedule"]]
        variants.append({"kind": "hyparflow", "np": c["P"] * c["R"], "extra": extra, **c})
    runs: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    for round_ in range(args.repeats):  # alternate variants so drift hits all alike
        for v in variants:
            print(f"[round {round_ + 1}/{args.repeats}] {v['name']} ...", flush=True)
            runs[v["name"]].append(_run(v["np"], v["kind"], args, v["extra"], v.get("env", {}), v.get("batch", 0)))
    report = _report(variants, runs, args)
    if args.comm_sizes:
        sizes = [s for s in args.comm_sizes.split(",") if s]
        report["comm"] = _run(2, "comm", args, ["--sizes", *sizes])
    previous = None
    if args.compare:  # read before this run's JSON is written, which may be the same file
        with open(args.compare) as f:
            previous = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    _print(report)
    if previous is not None:
        _print_compare(report, previous, args.compare)
    _chart(report, os.path.join(args.out, "bench.png"))
    print(f"wrote {args.out}/bench.json and {args.out}/bench.png")
    return 0


def _report(variants, runs, args) -> dict:
    rows = []
    keras_tp = dp_tp = None
    single_step = None
    throughput = {name: statistics.median(w for r in rs for w in r["throughput"]) for name, rs in runs.items()}
    # Keras's step time and CPU per step by (threads, samples a step)
    like = {(v.get("threads", _rank_threads(1)), v.get("batch", args.batch_size)): v["name"] for v in variants
            if v["kind"] == "keras"}  # fmt: skip
    step_with = {key: key[1] / throughput[name] for key, name in like.items()}
    cpu_with = {key: statistics.median(r["cpu_s_per_step"][0] for r in runs[name]) for key, name in like.items()}
    for v in variants:
        samples = [w for r in runs[v["name"]] for w in r["throughput"]]
        tp = throughput[v["name"]]
        row = {"name": v["name"], "ranks": v["np"], "throughput": tp, "windows": samples,
               "cpu_s_per_step": statistics.median(r["cpu_s_per_step"][0] for r in runs[v["name"]]),
               "peak_mb": max(m for r in runs[v["name"]] for m in (r["peak_mb"] or [0]))}  # fmt: skip
        if v["kind"] in ("keras", "hyparflow"):
            row.update(_call_timings(runs[v["name"]]))
        if v["kind"] == "keras" and "threads" not in v:
            keras_tp = tp
            single_step = args.batch_size / tp
        if v["kind"] == "dp":
            dp_tp, row["backend"] = tp, runs[v["name"]][0]["backend"]
        if v["kind"] == "hyparflow":
            P, M = v["P"], v["M"]
            stages = [s for s in runs[v["name"]][-1]["stages"] if s]
            row["stages"] = stages
            fill = (P - 1) / v["v"]  # micro-batch times of fill and drain: interleaving divides them
            row["bubble_bound"] = fill / (M + fill)
            # The ideal step: Keras's step on one replica's share of the batch, with the threads
            # one rank gets, split over P stages, plus the fill and drain of (P - 1) / v micro-batches
            # (for P=1: R such Kerases side by side, the data-parallel bound). `..._all_cores`:
            # Keras with every core, which ranks sharing those cores cannot reach.
            threads, batch = _like_a_rank(v, args)
            step = args.batch_size / tp
            ideal = step_with[threads, batch] / P * (M + fill) / M
            row.update(ideal_step_s=ideal, efficiency_vs_bubble_bound=ideal / step, ideal_threads=threads)
            row["ideal_batch"] = batch
            timed = args.windows * args.steps
            slowest = max(s["compute_cpu"] for s in stages) / timed
            row["work_efficiency"] = cpu_with[threads, batch] / P / slowest
            if P > 1:
                busy = [s["compute"] / s["wall"] for s in stages if s["wall"] > 0]
                row["bubble_measured"] = 1 - statistics.mean(busy) if busy else None
                row["efficiency_vs_bubble_bound_all_cores"] = single_step / (P * v["R"]) * (M + fill) / M / step
        rows.append(row)
    keras_bar = next((r["progress_bar_cost"] for r in rows if r["name"] == variants[0]["name"]), None)
    for row in rows:
        row["vs_keras"] = row["throughput"] / keras_tp if keras_tp else None
        row["vs_dp_baseline"] = row["throughput"] / dp_tp if dp_tp else None
        if "progress_bar_cost" in row and keras_bar is not None:
            row["progress_bar_cost_vs_keras"] = row["progress_bar_cost"] - keras_bar
    return {"model": args.model, "batch_size": args.batch_size, "cores": os.cpu_count(), "rows": rows}


def _call_timings(runs: list[dict]) -> dict:
    """Medians over rounds of the whole-call timings (see `_fit_calls`), and the share of
    throughput the progress bar costs."""
    out = {k: statistics.median(v for r in runs for v in r[k]) for k in CALL_TIMINGS}
    out["progress_bar_cost"] = 1 - out["throughput_verbose"] / out["throughput_epochs"]
    return out


NAME_WIDTH = 52  # the variant column: "keras model.fit (1 process) with 1 thread, batch 128"
CALL_TIMINGS = ("throughput_epochs", "throughput_verbose", "second_fit_startup_s", "second_fit_prestep_s")
STARTUP_TARGET_S, BAR_COST_MARGIN = 1.0, 0.05


def _print(report: dict) -> None:
    print(f"\n{report['model']}, global batch {report['batch_size']}, {report['cores']} cores")
    head = (
        f"{'variant':<{NAME_WIDTH}} {'ranks':>5} {'samples/s':>10} {'vs keras':>9} {'vs DP':>7} {'bubble':>14} "
        f"{'peak MB':>8} {'CPU ms/step':>11}"
    )
    print(head + "\n" + "-" * len(head))
    for r in report["rows"]:
        bubble = f"{r['bubble_measured']:.2f}/{r['bubble_bound']:.2f}" if r.get("bubble_measured") is not None else "-"
        name = r["name"] + (f" [{r['backend']}]" if r.get("backend") else "")
        print(
            f"{name[:NAME_WIDTH]:<{NAME_WIDTH}} {r['ranks']:>5} {r['throughput']:>10.1f} {r['vs_keras']:>9.2f} "
            f"{r['vs_dp_baseline']:>7.2f} {bubble:>14} {r['peak_mb']:>8.0f} {r['cpu_s_per_step'] * 1000:>11.0f}"
        )
        for s in r.get("stages", []):
            wall = s["wall"] or 1
            print(
                f"{'':<6}stage {s['stage']} replica {s['replica']}: compute {s['compute'] / wall:.0%} (CPU/wall "
                f"{s.get('compute_cpu', 0) / (s['compute'] or 1):.0%}), waiting on peers "
                f"{s['wait'] / wall:.0%}, allreduce {s['allreduce'] / wall:.0%}"
            )
        if r.get("efficiency_vs_bubble_bound") is not None:
            keras = f"Keras with {r['ideal_threads']} thread(s) on {r['ideal_batch']} samples"
            if "bubble_measured" not in r:  # no pipeline: the replicas' ideal is Kerases side by side
                print(f"{'':<6}step time vs ideal: {r['efficiency_vs_bubble_bound']:.2f} ({r['ranks']} x {keras})")
            else:
                print(
                    f"{'':<6}step time vs bubble-bound ideal: {r['efficiency_vs_bubble_bound']:.2f} ({keras}, as "
                    f"one rank, / P x (M+(P-1)/v)/M, v stages a rank); "
                    f"{r['efficiency_vs_bubble_bound_all_cores']:.2f} (Keras with all {report['cores']} cores)"
                )
            print(
                f"{'':<6}work balance (CPU, free of other processes' load): that Keras's CPU per step / P / the "
                f"slowest stage's compute CPU per step = {r['work_efficiency']:.2f}"
            )
    _print_calls(report["rows"])
    for size, c in report.get("comm", {}).items():
        print(
            f"{size:>5} MB  send/recv raw {c['sendrecv_raw_GBs']:.2f} GB/s, hyparflow "
            f"{c['sendrecv_hyparflow_GBs']:.2f} GB/s "
            f"({c['sendrecv_hyparflow_GBs'] / c['sendrecv_raw_GBs']:.0%});  allreduce raw "
            f"{c['allreduce_raw_GBs']:.2f} GB/s, "
            f"hyparflow {c['allreduce_hyparflow_GBs']:.2f} GB/s "
            f"({c['allreduce_hyparflow_GBs'] / c['allreduce_raw_GBs']:.0%})"
        )


def _print_calls(rows: list[dict]) -> None:
    """Whole fit calls, Keras beside hyparflow: throughput by windows of steps and by whole calls,
    with the progress bar off and on, and the start-up of a second fit call, against the targets."""
    rows = [r for r in rows if "throughput_epochs" in r]
    head = (
        f"\n{'whole fit calls':<{NAME_WIDTH}} {'steps':>9} {'epochs':>9} {'+bar':>9} {'bar cost':>9} {'2nd fit':>9}"
        f" {'of it':>9}\n"
        f"{'(samples/s; start-up in s)':<{NAME_WIDTH}} {'windows':>9} {'verbose=0':>9} {'verbose=1':>9} {'':>9}"
        f" {'start-up':>9} {'pre-step':>9}"
    )
    print(head + "\n" + "-" * (NAME_WIDTH + 60))
    for r in rows:
        print(
            f"{r['name'][:NAME_WIDTH]:<{NAME_WIDTH}} {r['throughput']:>9.1f} {r['throughput_epochs']:>9.1f} "
            f"{r['throughput_verbose']:>9.1f} "
            f"{r['progress_bar_cost']:>9.1%} {r['second_fit_startup_s']:>9.2f} {r['second_fit_prestep_s']:>9.2f}"
        )
        if r["name"].startswith("hyparflow"):
            startup_ok = r["second_fit_startup_s"] <= STARTUP_TARGET_S
            bar = r.get("progress_bar_cost_vs_keras")
            bar_text = "-" if bar is None else f"{bar:+.1%} vs keras's, {'ok' if bar <= BAR_COST_MARGIN else 'MISSED'}"
            print(
                f"{'':<6}targets: 2nd fit start-up <= {STARTUP_TARGET_S:.0f} s {'ok' if startup_ok else 'MISSED'}; "
                f"bar cost <= keras's + {BAR_COST_MARGIN:.0%}: {bar_text}"
            )


COMPARED = (
    "throughput",
    "throughput_epochs",
    "throughput_verbose",
    "second_fit_startup_s",
    "second_fit_prestep_s",
    "peak_mb",
)


def _print_compare(report: dict, old: dict, label: str) -> None:
    """The new numbers next to a previous run's (`old`, its bench.json), variant by variant."""
    print(f"\ncompared with {label} ({old.get('model')}, global batch {old.get('batch_size')}):")
    head = f"{'variant':<{NAME_WIDTH}} {'measure':<22} {'old':>10} {'new':>10} {'change':>8}"
    print(head + "\n" + "-" * len(head))
    before = {r["name"]: r for r in old.get("rows", [])}
    for r in report["rows"]:
        prev = before.get(r["name"])
        if prev is None:
            print(f"{r['name'][:NAME_WIDTH]:<{NAME_WIDTH}} (not in {label})")
            continue
        for key in COMPARED:
            if r.get(key) is not None and prev.get(key) is not None:
                change = r[key] / prev[key] - 1 if prev[key] else float("nan")
                numbers = f"{prev[key]:>10.3g} {r[key]:>10.3g} {change:>+8.0%}"
                print(f"{r['name'][:NAME_WIDTH]:<{NAME_WIDTH}} {key:<22} {numbers}")


def _chart(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(rows)))
    ax.barh([r["name"] for r in rows][::-1], [r["throughput"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("samples / s")
    ax.set_title(f"{report['model']}, global batch {report['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
