"""Run on 4 ranks: hyparflow training vs single-process Keras on the same global batches,
for the zoo under several grids, schedules and optimizers. Rank 0 trains the reference
copy and writes the comparison as JSON (argv[1])."""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
import zoo
from mpi4py import MPI

import hyparflow as hf
from hyparflow.checkpoint import optimizer_state

world = MPI.COMM_WORLD
rank = world.Get_rank()
results: dict[str, dict] = {}


def compiled(name, optimizer):
    model = zoo.ZOO[name]()
    n_out = len(model.outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.get(optimizer) if isinstance(optimizer, str) else keras.optimizers.SGD(0.1),
        loss=[loss] * n_out if n_out > 1 else loss,
        loss_weights=[1.0, 0.5] if n_out > 1 else None,
        metrics=[["accuracy"]] * n_out if n_out > 1 else ["accuracy"],
    )
    return model


def max_rel_err(a_weights, b_weights) -> float:
    return max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6)) for a, b in zip(a_weights, b_weights))


def case(key, name, P, M, schedule="1f1b", optimizer="sgd", n=48, batch=16, weights=False, epochs=1):
    model = compiled(name, optimizer)
    xs = zoo.sample_inputs(model, n)
    ys = zoo.sample_targets(model, n)
    sw = np.random.default_rng(5).uniform(0.2, 2.0, n).astype("float32") if weights else None
    x = xs if len(xs) > 1 else xs[0]
    y = ys if len(ys) > 1 else ys[0]
    hist = hf.fit(
        model,
        x,
        y,
        batch_size=batch,
        epochs=epochs,
        num_partitions=P,
        num_microbatches=M,
        schedule=schedule,
        shuffle=False,
        verbose=0,
        sample_weight=sw,
        balance="flops",
    )
    # optimizer state lives only where its variables do
    mine = sorted({k[0] for k in optimizer_state(model.optimizer, model) if isinstance(k[0], int)})
    owned = world.gather(mine, root=0)
    if rank == 0:
        ref = compiled(name, optimizer)
        href = ref.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, sample_weight=sw)
        results[key] = {
            "err": max_rel_err(model.get_weights(), ref.get_weights()),
            "moved": max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), compiled(name, optimizer).get_weights())),
            "history": hist.history,
            "ref_history": href.history,
            "owned": owned,
            "n_trainable": len(model.trainable_variables),
        }


case("mlp P4 M1 1f1b sgd", "mlp", 4, 1)
case("mlp P2 R2 M2 gpipe adam", "mlp", 2, 2, "gpipe", "adam")
case("mlp P1 R4 adam", "mlp", 1, 1, optimizer="adam")
case("mlp P4 M4 1f1b adam", "mlp", 4, 4, optimizer="adam")
case("resnet_bn P4 M1 sgd", "resnet_bn", 4, 1)
case("resnet_bn P4 M1 gpipe adam", "resnet_bn", 4, 1, "gpipe", "adam")
case("densenet P2 R2 M2 adam", "densenet", 2, 2, optimizer="adam")
case("multi_io P4 M4 sample weights adam", "multi_io", 4, 4, optimizer="adam", weights=True)
case("multi_io P1 R4 M2 sgd", "multi_io", 1, 2, weights=True)
case("multi_io P2 R2 M2 gpipe", "multi_io", 2, 2, "gpipe", weights=True)
case("shared P2 R2 M2 adam", "shared", 2, 2, optimizer="adam")
case("nested P4 M2", "nested", 4, 2)
case("sequential P2 R2 M2 adam", "sequential", 2, 2, optimizer="adam")
case("int_boundary P4 M2", "int_boundary", 4, 2)
# 50 samples, batch 18: 18 and 14 do not divide by 2 replicas x 4 micro-batches
case("uneven P2 R2 M4 adam", "mlp", 2, 4, optimizer="adam", n=50, batch=18)
case("history P2 R2 M2 two epochs", "mlp", 2, 2, optimizer="adam", epochs=2)

if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
