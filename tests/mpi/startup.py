"""Start-up and repeated-session scenarios: `startup.py MODE OUT`.

raise    ranks 1-3 raise while building their model; rank 0 reaches hf.fit
exit     rank 3 ends its script normally without calling hf.fit; the others call it
kill     rank 2 kills itself with SIGKILL before hf.fit
late     rank 3 reaches hf.fit a minute after the others
local    each rank resumes from its own node-local checkpoint folder (rank 1's has a newer one)
repeat   100 consecutive hf.fit calls with one layout (one session, memory flat), then 20
         with alternating layouts (closed sessions' communicators freed)
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time

import keras
import numpy as np
from mpi4py import MPI

import hyparflow as hf
from hyparflow import transport

rank = MPI.COMM_WORLD.Get_rank()
mode, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
X, Y = rng.standard_normal((32, 8)).astype("float32"), rng.integers(0, 3, 32)


def stamp() -> None:
    """When the fault happened (the test measures the time from here to the job's end)."""
    with open(os.environ["HYPARFLOW_FAULT_STAMP"], "w") as f:
        f.write(repr(time.time()))


def model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    x = keras.layers.Dense(8, activation="tanh")(inp)
    m = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(8, activation="tanh")(x)))
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def fit(m, **kw):
    kw = {"batch_size": 16, "num_partitions": 2, "verbose": 0, "balance": "flops"} | kw
    return hf.fit(m, X, Y, **kw)


if mode == "raise":
    if rank > 0:
        stamp()
        raise RuntimeError(f"the model failed to build on rank {rank}")
    fit(model())
elif mode == "exit":
    if rank == 3:
        stamp()
        sys.exit(0)
    fit(model())
elif mode == "kill":
    if rank == 2:
        stamp()
        os.kill(os.getpid(), signal.SIGKILL)
    fit(model())
elif mode == "late":
    if rank == 3:
        stamp()
        time.sleep(60)
    fit(model())
elif mode == "local":
    shared = os.path.join(out + ".d", "shared")
    fit(model(), epochs=2, checkpoint_dir=shared)  # rank 0 writes epoch-00001 and epoch-00002
    mine = os.path.join(out + ".d", f"node{rank}")
    if rank == 0:
        for r in range(MPI.COMM_WORLD.Get_size()):
            os.makedirs(os.path.join(out + ".d", f"node{r}"), exist_ok=True)
            for e in (1, 2) if r == 1 else (1,):  # rank 1's node holds a newer checkpoint
                name = f"epoch-{e:05d}.keras"
                os.link(os.path.join(shared, name), os.path.join(out + ".d", f"node{r}", name))
    MPI.COMM_WORLD.Barrier()

    class Epochs(keras.callbacks.Callback):
        seen: list[int] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.seen.append(epoch)

    fit(model(), epochs=3, checkpoint_dir=mine, callbacks=[Epochs()])
    seen = MPI.COMM_WORLD.gather(Epochs.seen, root=0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"epochs": seen}, f)
elif mode == "repeat":
    groups = []
    original = transport.Transport.form_grid

    def recording(self, *args, **kw):
        grid = original(self, *args, **kw)
        groups.extend([self.pipe, self.data])
        return grid

    transport.Transport.form_grid = recording
    m, rss = model(), []
    for _ in range(100):  # the same layout: one session, reused
        fit(m, steps_per_epoch=1)
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    reused = len(groups)
    for i in range(20):  # a new layout every call: a new session, the previous one closed
        fit(m, steps_per_epoch=1, num_microbatches=2 + i % 2)
    leaked = sum(g != MPI.COMM_NULL for g in groups[:-2])  # the newest session stays open for reuse
    result = MPI.COMM_WORLD.gather({"reused": reused, "groups": len(groups), "leaked": leaked, "rss_mb": rss}, root=0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
