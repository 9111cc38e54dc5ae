"""Fault injection: `faults.py PHASE RANK PARTITIONS` trains on all ranks and makes rank
RANK fail in PHASE (forward | backward | allreduce | callback) on the third step.
`faults.py kill RANK PARTITIONS CKDIR OUT` kills rank RANK with SIGKILL mid-epoch unless
CKDIR already holds a checkpoint; otherwise it resumes and compares with an uninterrupted
run. `faults.py mismatch` builds a different model on rank 1."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from mpi4py import MPI

import hyparflow as hf
from hyparflow import transport

rank = MPI.COMM_WORLD.Get_rank()
what = sys.argv[1]
FAIL_RANK = int(sys.argv[2]) if len(sys.argv) > 2 else -1
FAIL_STEP = 2
calls = {"forward": 0, "backward": 0}


def inject(kind):
    """Raise the injected fault, after noting when (the test measures time to exit)."""
    with open(os.environ["HYPARFLOW_FAULT_STAMP"], "w") as f:
        f.write(repr(time.time()))
    raise RuntimeError(f"injected {kind} fault")


def tripwire(kind):
    def check(x):
        calls[kind] += 1
        if rank == FAIL_RANK and calls[kind] > FAIL_STEP:
            inject(kind)
        return x

    return check


class Trip(keras.layers.Layer):
    """Identity that raises on FAIL_RANK in its forward or in its backward pass."""

    def __init__(self, kind, **kw):
        super().__init__(**kw)
        self.kind = kind

    def call(self, x):
        if self.kind == "forward":
            y = tf.py_function(tripwire("forward"), [x], x.dtype)
            return x + tf.stop_gradient(tf.reshape(y, tf.shape(x)) * 0.0)

        @tf.custom_gradient
        def ident(v):
            def grad(dy):
                g = tf.py_function(tripwire("backward"), [dy], dy.dtype)
                g.set_shape(dy.shape)
                return g

            return tf.identity(v), grad

        return ident(x)

    def compute_output_shape(self, shape):
        return shape


def model(width=16, kind=None):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    x = inp
    for _ in range(4):
        x = keras.layers.Dense(width, activation="tanh")(x)
        if kind in ("forward", "backward"):
            x = Trip(kind)(x)
    m = keras.Model(inp, keras.layers.Dense(3)(x))
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


rng = np.random.default_rng(0)
X = rng.standard_normal((96, 8)).astype("float32")
Y = rng.integers(0, 3, 96)

if what in ("forward", "backward", "allreduce", "callback"):
    P = int(sys.argv[3])
    callbacks = []
    if what == "allreduce":
        original = transport.Transport.allreduce

        def failing(self, send, recv, label, **kw):
            # Any allreduce: the gradient one (replicas) or the world's log/stop reductions
            # (a 4x1 pipeline has no gradient allreduce: nothing to average).
            if rank == FAIL_RANK:
                calls["forward"] += 1
                if calls["forward"] > FAIL_STEP:
                    inject("allreduce")
            return original(self, send, recv, label, **kw)

        transport.Transport.allreduce = failing
    if what == "callback":

        class Boom(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if rank == FAIL_RANK and batch >= FAIL_STEP:
                    inject("callback")

        callbacks.append(Boom())
    hf.fit(
        model(kind=what),
        X,
        Y,
        batch_size=16,
        epochs=3,
        num_partitions=P,
        num_microbatches=2,
        verbose=0,
        callbacks=callbacks,
        balance="flops",
    )
    print("finished without the fault", flush=True)

elif what == "kill":
    P, ckdir, out = int(sys.argv[3]), sys.argv[4], sys.argv[5]
    resuming = bool(hf.checkpoint.checkpoints(ckdir))

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if not resuming and rank == FAIL_RANK and self.epoch == 2 and batch == 2:
                with open(os.environ["HYPARFLOW_FAULT_STAMP"], "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)

    m = model()
    hf.fit(
        m,
        X,
        Y,
        batch_size=16,
        epochs=4,
        num_partitions=P,
        verbose=0,
        callbacks=[Kill()],
        checkpoint_dir=ckdir,
        balance="flops",
    )
    ref = model()
    hf.fit(ref, X, Y, batch_size=16, epochs=4, num_partitions=P, verbose=0, balance="flops")
    if rank == 0:
        err = max(float(np.abs(a - b).max()) for a, b in zip(m.get_weights(), ref.get_weights()))
        with open(out, "w") as f:
            json.dump({"err": err, "resumed": resuming}, f)

elif what == "stall":

    class Sleepy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if rank == FAIL_RANK and batch == FAIL_STEP:
                time.sleep(60)

    hf.fit(model(), X, Y, batch_size=16, num_partitions=2, verbose=0, callbacks=[Sleepy()])

elif what == "mismatch":
    hf.fit(model(width=16 if rank != 1 else 12), X, Y, batch_size=16, num_partitions=2, verbose=0)

elif what == "settings":
    hf.fit(model(), X, Y, batch_size=16 if rank != 2 else 32, num_partitions=2, verbose=0)

elif what == "worldsize":
    hf.fit(model(), X, Y, batch_size=16, num_partitions=3, verbose=0)
