"""`hyparflow bench --input`: input work per rank against the number of replicas, for one
global `tf.data` pipeline (every reading rank runs it whole and keeps its replica's share)
and for `hyparflow.PerReplica` (each replica runs its shard only).

The pipeline's per-sample map runs a fixed amount of NumPy math in a `py_function` (standing
in for decoding and augmentation) and records the CPU time it took on each rank. Each
variant runs as its own job, alternating over `--repeats` rounds; a worker prints one JSON
line with every rank's map calls and map CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from hyparflow.launch import job_result, report

WIDTH = 32


def _pipeline(samples: int, work: int, shard: tuple[int, int] | None, batch: int, spent: list[float]):
    """The dataset: `samples` rows, each mapped through `work` rounds of a 96x96 matrix product."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, WIDTH)).astype("float32")
    y = rng.integers(0, 10, samples)
    lock = threading.Lock()
    m = rng.standard_normal((96, 96)) / 10

    def heavy(row):
        t0 = time.thread_time()
        a = np.eye(96)
        for _ in range(work):
            a = np.tanh(a @ m)
        with lock:
            spent[0] += time.thread_time() - t0
            spent[1] += 1
        return row + np.float32(a[0, 0] * 0)

    def decode(row, label):
        out = tf.py_function(heavy, [row], tf.float32)
        out.set_shape((WIDTH,))
        return out, label

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shard is not None:
        ds = ds.shard(*shard)
    return ds.map(decode).batch(batch)


def worker(args) -> dict[str, Any] | None:
    import keras

    import hyparflow as hf
    from hyparflow import session

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((WIDTH,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    spent = [0.0, 0]
    if args.kind == "global":
        x: Any = _pipeline(args.samples, args.work, None, args.batch_size, spent)
    else:
        x = hf.PerReplica(
            lambda c: _pipeline(
                args.samples,
                args.work,
                (c.num_replicas, c.replica_id),
                c.get_per_replica_batch_size(args.batch_size),
                spent,
            )  # fmt: skip
        )
    t0 = time.perf_counter()
    h = hf.fit(model, x, epochs=1, verbose=0, num_partitions=1)
    wall = time.perf_counter() - t0
    s = session._SESSIONS[model][1]
    rows = s.transport.gather({"map_cpu_s": spent[0], "map_calls": spent[1], "fit_s": wall}, root=0)
    if rows is None:
        return None
    return {"ranks": rows, "loss": h.history["loss"][-1]}


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["global", "per-replica"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--work", type=int, default=60)
    result = worker(p.parse_args(argv))
    if result is not None:
        report(result)
    return 0


# ---- the driver --------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="store_true", help="measure input work per rank against the replicas")
    p.add_argument("--input-replicas", default="1,2", help="replica counts for --input")
    p.add_argument("--input-samples", type=int, default=256, help="samples per epoch for --input")
    p.add_argument("--input-work", type=int, default=60, help="matrix products per sample in --input's map")


def _run(kind: str, replicas: int, args) -> dict:
    cmd = [sys.executable, "-m", "hyparflow.inputbench", kind, "--batch-size", str(args.batch_size),
           "--samples", str(args.input_samples), "--work", str(args.input_work)]  # fmt: skip
    return job_result(cmd, replicas)


def main(args) -> int:
    counts = [int(r) for r in args.input_replicas.split(",") if r]
    variants = [(kind, r) for r in counts for kind in ("global", "per-replica")]
    runs: dict[str, list[dict]] = {f"{kind} R={r}": [] for kind, r in variants}
    for round_ in range(args.repeats):  # alternating, so that the machine's drift hits all alike
        for kind, r in variants:
            print(f"[round {round_ + 1}/{args.repeats}] {kind} R={r} ...", flush=True)
            runs[f"{kind} R={r}"].append(_run(kind, r, args))
    report = {name: _summary(results) for name, results in runs.items()}
    base = {kind: report[f"{kind} R={counts[0]}"]["map_cpu_s_per_rank"] for kind in ("global", "per-replica")}
    for name, row in report.items():
        row["vs_first"] = row["map_cpu_s_per_rank"] / base[name.split(" R=")[0]]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "input.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{'variant':<18} {'map calls/rank':>15} {'map CPU s/rank':>15} {f'x R={counts[0]}':>8} {'fit s':>7}")
    for name, row in report.items():
        print(f"{name:<18} {row['map_calls_per_rank']:>15.0f} {row['map_cpu_s_per_rank']:>15.3f} "
              f"{row['vs_first']:>8.2f} {row['fit_s']:>7.2f}")  # fmt: skip
    print(f"wrote {args.out}/input.json")
    return 0


def _summary(results: list[dict]) -> dict[str, Any]:
    """Per variant: the mean over ranks of map calls and the lowest map CPU over rounds."""
    cpu = min(sum(r["map_cpu_s"] for r in res["ranks"]) / len(res["ranks"]) for res in results)
    calls = sum(r["map_calls"] for r in results[0]["ranks"]) / len(results[0]["ranks"])
    fit = min(max(r["fit_s"] for r in res["ranks"]) for res in results)
    return {"map_cpu_s_per_rank": cpu, "map_calls_per_rank": calls, "fit_s": fit, "loss": results[0]["loss"]}


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
