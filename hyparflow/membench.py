"""`hyparflow bench --memory`: peak memory per rank of `hyparflow.fit` next to plain Keras
`model.fit` in one process, both above a bare TensorFlow process (which imports
TensorFlow and runs one tiny op), and the planner's estimate against the measurement.

Each variant runs as its own job (alternating over `--repeats` rounds); a worker prints one
JSON line with the peak resident set (`ru_maxrss`) of each of its ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from typing import Any

from hyparflow.launch import job_result, report

# name: (hidden layers, width, optimizer): the 67 M-parameter MLP with Adam, twice
# as deep (a rank's fixed runtime, some 60-80 MB, weighs less next to its stage), a model
# with another optimizer (one slot per variable) to check the estimate on; a tiny one for tests.
MODELS = {
    "mlp": (16, 2048, "adam"),
    "mlp-deep": (32, 2048, "adam"),
    "mlp-sgd": (8, 3072, "sgd"),
    "mlp-tiny": (4, 64, "adam"),
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(name: str):
    """The model, compiled, and its data: `steps` global batches of `batch` samples."""
    import keras

    layers, width, opt = MODELS[name]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((width,))
    x = inputs
    for _ in range(layers):
        x = keras.layers.Dense(width, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x), name=name)
    optimizer = keras.optimizers.Adam(1e-4) if opt == "adam" else keras.optimizers.SGD(1e-3, momentum=0.9)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(name: str, batch: int, steps: int):
    import numpy as np

    rng = np.random.default_rng(0)
    width = MODELS[name][1]
    return rng.standard_normal((batch * steps, width)).astype("float32"), rng.integers(0, 10, batch * steps)


# ---- workers -----------------------------------------------------------------------------
def worker(args) -> dict[str, Any] | None:
    if args.kind == "baseline":
        import tensorflow as tf

        float(tf.reduce_sum(tf.ones(2)))
        return {"peak_mb": [_peak_mb()]}
    if args.kind == "keras":
        model = build(args.model)
        x, y = _data(args.model, args.batch_size, args.steps)
        h = model.fit(x, y, batch_size=args.batch_size, shuffle=False, verbose=0)
        return {"peak_mb": [_peak_mb()], "loss": h.history["loss"][-1]}
    import hyparflow as hf
    from hyparflow import memory, session

    model = build(args.model)
    x, y = _data(args.model, args.batch_size, args.steps)
    h = hf.fit(model, x, y, batch_size=args.batch_size, shuffle=False, verbose=0, num_partitions=args.P,
               num_microbatches=args.M, gather=args.gather, balance="params", recompute=args.recompute)  # fmt: skip
    s = session._SESSIONS[model][1]
    micro = args.batch_size // (s.R * s.M)
    direct = [s.grid.stage] if s.compute.updates_in_backward(s.M) else []
    stages = memory.estimate(s.plan, model.optimizer, micro, s.M, s.layout.schedule, updates_in_backward=direct)
    at_end = args.gather == "all" or (args.gather == "rank0" and s.transport.rank == 0)
    mine = {
        "peak_mb": _peak_mb(),
        "stage": s.grid.stage,
        "estimate_mb": memory.rank_peak(s.plan, stages, s.grid.stage, at_end) / 2**20,
        "stage_estimate": vars(stages[s.grid.stage]),
    }
    rows = s.transport.gather(mine, root=0)
    if rows is None:
        return None
    return {"peak_mb": [r["peak_mb"] for r in rows], "ranks": rows, "loss": h.history["loss"][-1]}


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["baseline", "keras", "hyparflow"])
    p.add_argument("--model", default="mlp", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--P", type=int, default=1)
    p.add_argument("--M", type=int, default=1)
    p.add_argument("--gather", default="rank0")
    p.add_argument("--recompute", action="store_true")
    result = worker(p.parse_args(argv))
    if result is not None:
        report(result)
    return 0


# ---- the driver --------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", action="store_true", help="measure peak memory per rank instead of throughput")
    p.add_argument("--memory-models", default="mlp,mlp-sgd", help=f"models for --memory, of {sorted(MODELS)}")
    p.add_argument(
        "--memory-configs",
        default="4x2:rank0,4x2:none,2x2:rank0,2x2:none,2x1:none:recompute",
        help="PxM:gather[:recompute] grids for --memory",
    )


def _run(kind: str, model: str, args, np_: int = 1, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "hyparflow.membench", kind, "--model", model,
           "--batch-size", str(args.batch_size), *extra]  # fmt: skip
    return job_result(cmd, np_ if kind == "hyparflow" else None)


def main(args) -> int:
    report: dict[str, Any] = {}
    for model in filter(None, args.memory_models.split(",")):
        variants: list[tuple[str, str, int, tuple[str, ...]]] = [("baseline", "baseline", 1, ())]
        variants.append(("keras", "keras", 1, ()))
        for item in filter(None, args.memory_configs.split(",")):
            grid, gather, *flags = item.split(":") + [""]
            P, M = (int(v) for v in grid.split("x"))
            recompute = "recompute" in flags
            extra: tuple[str, ...] = ("--P", str(P), "--M", str(M), "--gather", gather or "rank0")
            name = f"hyparflow P={P} M={M} gather={gather or 'rank0'}" + (" recompute" if recompute else "")
            variants.append((name, "hyparflow", P, extra + (("--recompute",) if recompute else ())))
        runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
        for round_ in range(args.repeats):  # alternating, so that the machine's drift hits all alike
            for name, kind, np_, extra in variants:
                print(f"[{model}, round {round_ + 1}/{args.repeats}] {name} ...", flush=True)
                runs[name].append(_run(kind, model, args, np_, extra))
        report[model] = _summary(runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(report, f, indent=1)
    _print(report)
    print(f"wrote {args.out}/memory.json")
    return 0


def _summary(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Per variant and rank, the lowest peak over the rounds (other processes only add)."""
    base = min(r["peak_mb"][0] for r in runs["baseline"])
    keras_above = min(r["peak_mb"][0] for r in runs["keras"]) - base
    rows = {}
    for name, results in runs.items():
        if name == "baseline":
            continue
        peaks = [min(r["peak_mb"][i] for r in results) for i in range(len(results[0]["peak_mb"]))]
        row: dict[str, Any] = {
            "peak_mb": peaks,
            "above_mb": [p - base for p in peaks],
            "ratio": [(p - base) / keras_above for p in peaks],
            "loss": results[0].get("loss"),
        }
        if "ranks" in results[0]:
            row["estimate_mb"] = [r["estimate_mb"] for r in results[0]["ranks"]]
            row["estimate_error"] = [e / a - 1 for e, a in zip(row["estimate_mb"], row["above_mb"])]
            row["stage_estimate"] = [r["stage_estimate"] for r in results[0]["ranks"]]
        rows[name] = row
    return {"baseline_mb": base, "keras_above_mb": keras_above, "variants": rows}


def _print(report: dict) -> None:
    for model, r in report.items():
        print(f"\n{model}: bare TensorFlow process {r['baseline_mb']:.0f} MB; Keras model.fit peak "
              f"{r['keras_above_mb']:.0f} MB above it")  # fmt: skip
        print(f"{'variant':<34} {'rank':>4} {'peak MB':>8} {'above':>7} {'x Keras':>8} {'estimate':>9} {'error':>7}")
        for name, row in r["variants"].items():
            for i, (peak, above, ratio) in enumerate(zip(row["peak_mb"], row["above_mb"], row["ratio"])):
                est = row.get("estimate_mb")
                tail = f" {est[i]:>8.0f}M {100 * row['estimate_error'][i]:>+6.0f}%" if est else ""
                print(f"{name:<34} {i:>4} {peak:>8.0f} {above:>7.0f} {ratio:>8.2f}{tail}")
            print(f"{'':<34} final loss {row['loss']:.6f}")


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
