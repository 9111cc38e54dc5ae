"""Run on 3 ranks (P=3: stage 1 reads no data): streams iterated only where read, batch sizes
and the end of unknown-length streams passed to the middle stage, the progress bar fed by
non-blocking log reductions, all under real MPI. Writes JSON results to argv[1] (rank 0)."""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
import tensorflow as tf
import zoo
from mpi4py import MPI

import hyparflow as hf
from hyparflow.session import _SESSIONS

world = MPI.COMM_WORLD
rank = world.Get_rank()
rng = np.random.default_rng(0)
X = rng.standard_normal((40, 12)).astype("float32")  # batches of 16: 16, 16 and 8
Y = rng.integers(0, 4, 40)
LAYOUT = dict(num_partitions=3, num_microbatches=2, balance="flops")


def mlp():
    m = zoo.mlp(0)
    m.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return m


def weights_err(a, b) -> float:
    return max(float(np.abs(x - y).max() / (np.abs(y).max() + 1e-6)) for x, y in zip(a, b))


pulls = 0


def generator():
    global pulls
    for b in range(3):
        pulls += 1
        yield X[16 * b : 16 * (b + 1)], Y[16 * b : 16 * (b + 1)]


def dataset():
    return tf.data.Dataset.from_tensor_slices((X, Y)).filter(lambda x, y: True).batch(16)  # unknown length


out: dict[str, object] = {}
model = mlp()
history = hf.fit(model, generator(), epochs=1, verbose=1, **LAYOUT).history
ref = mlp()
ref_history = ref.fit(generator(), epochs=1, verbose=0).history
pulls -= 3  # the reference's
facts = world.gather({"stage": _SESSIONS[model][1].grid.stage, "pulls": pulls}, root=0)
out["generator"] = {"ranks": facts, "history": history, "ref_history": ref_history}
if rank == 0:
    out["generator"]["err"] = weights_err(model.get_weights(), ref.get_weights())

kw = dict(epochs=2, shuffle=False, verbose=1, validation_data=dataset())
model = mlp()
history = hf.fit(model, dataset(), **kw, **LAYOUT).history
ref = mlp()
ref_history = ref.fit(dataset(), **kw).history
out["dataset"] = {"history": history, "ref_history": ref_history}
if rank == 0:
    out["dataset"]["err"] = weights_err(model.get_weights(), ref.get_weights())
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
