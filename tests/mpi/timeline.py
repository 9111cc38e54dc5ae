"""Run on 4 ranks: fit with a timeline, from the argument (1F1B, 2 stages x 2 replicas, with
validation, a gradient bucket per variable) and from HYPARFLOW_TIMELINE (GPipe, 4 stages), then a fit with neither.
Writes to argv[1] (rank 0) where the traces are and what each fit ran."""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import zoo
from mpi4py import MPI

import hyparflow as hf

os.environ["HYPARFLOW_BUCKET_MB"] = "0.0001"  # a bucket per variable: several hand-overs per backward
world = MPI.COMM_WORLD
rank = world.Get_rank()
tmp = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "traces")  # the test's own folder
if rank == 0:
    os.makedirs(tmp)


def mlp():
    m = zoo.mlp(0)
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


rng = np.random.default_rng(0)
X = rng.standard_normal((48, 12)).astype("float32")
Y = rng.integers(0, 4, 48)
runs = {
    "1f1b": dict(path=os.path.join(tmp, "sub", "trace-1f1b.json"), P=2, R=2, M=4, steps=6, test_steps=4),
    "gpipe": dict(path=os.path.join(tmp, "trace-gpipe.json"), P=4, R=1, M=3, steps=3, test_steps=0),
}
model = mlp()
hf.fit(
    model,
    X,
    Y,
    batch_size=16,
    epochs=2,
    verbose=0,
    num_partitions=2,
    num_microbatches=4,
    validation_data=(X[:20], Y[:20]),
    validation_batch_size=10,
    timeline=runs["1f1b"]["path"],
    balance="params",  # a cut timing cannot move: each stage holds several layers, so several buckets
)
os.environ["HYPARFLOW_TIMELINE"] = runs["gpipe"]["path"]
hf.fit(mlp(), X, Y, batch_size=16, epochs=1, verbose=0, num_partitions=4, num_microbatches=3, schedule="gpipe")
del os.environ["HYPARFLOW_TIMELINE"]
world.Barrier()
before = os.stat(runs["1f1b"]["path"]).st_mtime_ns if rank == 0 else 0
hf.fit(
    model, X, Y, batch_size=16, epochs=1, verbose=0, num_partitions=2, num_microbatches=4, balance="params"
)  # reused session, no trace

if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(
            {
                "runs": runs,
                "untouched": os.stat(runs["1f1b"]["path"]).st_mtime_ns == before,
                "files": sorted(os.listdir(tmp)),
            },
            f,
        )
