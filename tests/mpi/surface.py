"""Run on 4 ranks: the Keras-native surface of hyparflow against plain Keras.
Writes JSON results to argv[1] (rank 0) and per-rank facts gathered from every rank."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
import zoo
from mpi4py import MPI

import hyparflow as hf
from hyparflow import data as datasets
from hyparflow import models

world = MPI.COMM_WORLD
rank = world.Get_rank()
out: dict[str, object] = {}
tmp = world.bcast(tempfile.mkdtemp(prefix="hf-surface-") if rank == 0 else None, root=0)


def weights_err(a, b) -> float:
    return max(float(np.abs(x - y).max() / (np.abs(y).max() + 1e-6)) for x, y in zip(a, b))


def mlp(seed=0):
    m = zoo.mlp(seed)
    m.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return m


rng = np.random.default_rng(0)
X = rng.standard_normal((80, 12)).astype("float32")
Y = rng.integers(0, 4, 80)
XV = rng.standard_normal((30, 12)).astype("float32")
YV = rng.integers(0, 4, 30)

# 1. History with validation, P=2 x R=2, per epoch, vs model.fit
m = mlp()
h = hf.fit(
    m,
    X,
    Y,
    batch_size=16,
    epochs=3,
    num_partitions=2,
    num_microbatches=2,
    shuffle=False,
    verbose=0,
    validation_data=(XV, YV),
)
if rank == 0:
    ref = mlp()
    out["history"] = {
        "ours": h.history,
        "ref": ref.fit(X, Y, batch_size=16, epochs=3, shuffle=False, verbose=0, validation_data=(XV, YV)).history,
    }

# 2. EarlyStopping and a stop decided on one rank only
es = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)
h = hf.fit(mlp(), X, Y, batch_size=16, epochs=6, num_partitions=2, verbose=0, callbacks=[es])
out_epochs = world.gather(len(h.epoch), root=0)


class StopOnRank1(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if rank == 1 and batch == 2:
            self.model.stop_training = True


h = hf.fit(mlp(), X, Y, batch_size=16, epochs=4, num_partitions=4, verbose=0, callbacks=[StopOnRank1()])
stop_epochs = world.gather(len(h.epoch), root=0)
if rank == 0:
    out["early_stopping_epochs"] = out_epochs
    out["rank1_stop_epochs"] = stop_epochs

# 3. Save under P=2 x R=2, resume under P=4 x R=1 and under plain Keras
full = mlp()
hf.fit(full, X, Y, batch_size=16, epochs=2, num_partitions=2, shuffle=False, verbose=0)
first = mlp()
hf.fit(first, X, Y, batch_size=16, epochs=1, num_partitions=2, shuffle=False, verbose=0)
path = os.path.join(tmp, "p2r2.keras")
hf.save(first, path)
resumed = mlp(seed=7)  # different initial weights: everything must come from the file
hf.fit(
    resumed,
    X,
    Y,
    batch_size=16,
    epochs=2,
    initial_epoch=1,
    num_partitions=4,
    shuffle=False,
    verbose=0,
    resume_from=path,
)
if rank == 0:
    plain = keras.models.load_model(path)
    plain.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    out["resume_p4"] = weights_err(resumed.get_weights(), full.get_weights())
    out["resume_keras"] = weights_err(plain.get_weights(), full.get_weights())
    out["resume_moved"] = float(max(np.abs(a - b).max() for a, b in zip(first.get_weights(), full.get_weights())))

# 4. Periodic checkpoints keep the newest K; resume continues from the newest
ckdir = os.path.join(tmp, "ck")
hf.fit(
    mlp(),
    X,
    Y,
    batch_size=16,
    epochs=3,
    num_partitions=2,
    shuffle=False,
    verbose=0,
    checkpoint_dir=ckdir,
    checkpoint_keep=2,
)
listing = sorted(os.listdir(ckdir)) if rank == 0 else None
again = mlp(seed=3)
h = hf.fit(
    again,
    X,
    Y,
    batch_size=16,
    epochs=4,
    num_partitions=2,
    shuffle=False,
    verbose=0,
    checkpoint_dir=ckdir,
    checkpoint_keep=2,
)
cont = mlp()
hf.fit(cont, X, Y, batch_size=16, epochs=4, num_partitions=2, shuffle=False, verbose=0)
if rank == 0:
    out["checkpoints"] = listing
    out["after_resume"] = sorted(os.listdir(ckdir))
    out["resumed_epochs"] = h.epoch
    out["checkpoint_resume_err"] = weights_err(again.get_weights(), cont.get_weights())

# 5. predict and evaluate of a multi-output model vs Keras
mm = zoo.multi_io()
mm.compile(
    optimizer="sgd",
    loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * 2,
    metrics=[["accuracy"], ["accuracy"]],
)
xs, ys = zoo.sample_inputs(mm, 37), zoo.sample_targets(mm, 37)
preds = hf.predict(mm, xs, batch_size=10, num_partitions=2, num_microbatches=2)
ev = hf.evaluate(mm, xs, ys, batch_size=10, num_partitions=4, num_microbatches=3, return_dict=True)
if rank == 0:
    ref_preds = mm.predict(xs, batch_size=10, verbose=0)
    out["predict_err"] = max(float(np.abs(a - b).max()) for a, b in zip(preds, ref_preds))
    out["predict_shapes"] = [list(p.shape) for p in preds]
    # one Keras batch: Keras's own per-output loss trackers weight a partial last batch oddly
    out["evaluate"] = {"ours": ev, "ref": mm.evaluate(xs, ys, batch_size=37, verbose=0, return_dict=True)}

# 6. tf.data with 45 samples (not divisible by 2 replicas x 2 micro-batches)
n_seen = []


class Count(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        n_seen.append(batch)


ds = tf.data.Dataset.from_tensor_slices((X[:45], Y[:45])).batch(10)
dm = mlp()
h = hf.fit(dm, ds, epochs=2, num_partitions=2, num_microbatches=2, verbose=0, callbacks=[Count()])
if rank == 0:
    ref = mlp()
    href = ref.fit(ds, epochs=2, verbose=0)
    out["dataset"] = {
        "ours": h.history,
        "ref": href.history,
        "err": weights_err(dm.get_weights(), ref.get_weights()),
        "batches": len(n_seen),
    }

# 7. The model trains: digits, small CNN, P=2 x R=2 x M=4 vs plain model.fit
x, y, xt, yt, k = datasets.load("digits")
keras.utils.set_random_seed(0)
cnn = models.build("cnn", x.shape[1:], k)
cnn.compile(
    optimizer=keras.optimizers.Adam(0.003),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
init = cnn.get_weights()
hf.fit(cnn, x, y, batch_size=64, epochs=6, num_partitions=2, num_microbatches=4, verbose=0, shuffle=False)
acc = hf.evaluate(cnn, xt, yt, batch_size=128, num_partitions=2, return_dict=True)["accuracy"]
if rank == 0:
    keras.utils.set_random_seed(0)
    ref = models.build("cnn", x.shape[1:], k)
    ref.compile(
        optimizer=keras.optimizers.Adam(0.003),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ref.set_weights(init)
    ref.fit(x, y, batch_size=64, epochs=6, verbose=0, shuffle=False)
    out["digits"] = {"ours": acc, "ref": ref.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]}

# 8. Mixed precision: boundary tensors in the compute dtype, loss scaling as Keras does it
out["mixed"] = {}
for policy in ("mixed_float16", "mixed_bfloat16"):
    keras.mixed_precision.set_global_policy(policy)
    mp = mlp()
    hmp = hf.fit(mp, X, Y, batch_size=16, epochs=2, num_partitions=2, num_microbatches=2, shuffle=False, verbose=0)
    dtypes = sorted({t.dtype for st in hf.plan(mp, 2, balance="flops").stages for t in st.outputs})
    if rank == 0:
        ref = mlp()
        href = ref.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        # The policy's noise floor: Keras against itself on inputs moved by half a unit in
        # the last place of the compute dtype (what rounding at another split does).
        twin = mlp()
        twin.fit(
            X * (1 + {"mixed_float16": 2**-11, "mixed_bfloat16": 2**-8}[policy]),
            Y,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
        )
        out["mixed"][policy] = {
            "floor": weights_err(
                [w.astype("float32") for w in twin.get_weights()], [w.astype("float32") for w in ref.get_weights()]
            ),
            "err": weights_err(
                [w.astype("float32") for w in mp.get_weights()], [w.astype("float32") for w in ref.get_weights()]
            ),
            "loss": hmp.history["loss"],
            "ref_loss": href.history["loss"],
            "boundary_dtypes": dtypes,
            "optimizer": type(mp.optimizer).__name__,
        }
keras.mixed_precision.set_global_policy("float32")

if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
