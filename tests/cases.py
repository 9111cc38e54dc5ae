"""Equivalence cases shared by the MPI run (tests/mpi/equivalence.py, 4 real ranks) and the
in-process loopback run (tests/test_loopback.py): hyparflow training vs single-process Keras
on the same global batches, for the zoo under several grids, schedules and optimizers."""

from __future__ import annotations

import keras
import numpy as np
import zoo

import hyparflow as hf

# name -> (model, P, M, schedule, optimizer, samples, batch, sample weights, epochs); R = 4 / P
CASES: dict[str, tuple] = {
    "mlp P4 M1 1f1b sgd": ("mlp", 4, 1, "1f1b", "sgd", 48, 16, False, 1),
    "mlp P2 R2 M2 gpipe adam": ("mlp", 2, 2, "gpipe", "adam", 48, 16, False, 1),
    "mlp P1 R4 adam": ("mlp", 1, 1, "1f1b", "adam", 48, 16, False, 1),
    "mlp P4 M4 1f1b adam": ("mlp", 4, 4, "1f1b", "adam", 48, 16, False, 1),
    "resnet_bn P4 M1 sgd": ("resnet_bn", 4, 1, "1f1b", "sgd", 48, 16, False, 1),
    "resnet_bn P4 M1 gpipe adam": ("resnet_bn", 4, 1, "gpipe", "adam", 48, 16, False, 1),
    "densenet P2 R2 M2 adam": ("densenet", 2, 2, "1f1b", "adam", 48, 16, False, 1),
    "multi_io P4 M4 sample weights adam": ("multi_io", 4, 4, "1f1b", "adam", 48, 16, True, 1),
    "multi_io P2 R2 M2 gpipe": ("multi_io", 2, 2, "gpipe", "sgd", 48, 16, True, 1),
    "multi_io P1 R4 M2 sgd": ("multi_io", 1, 2, "1f1b", "sgd", 48, 16, True, 1),
    "shared P2 R2 M2 adam": ("shared", 2, 2, "1f1b", "adam", 48, 16, False, 1),
    "nested P4 M2": ("nested", 4, 2, "1f1b", "sgd", 48, 16, False, 1),
    "sequential P2 R2 M2 adam": ("sequential", 2, 2, "1f1b", "adam", 48, 16, False, 1),
    # weights without a gradient are left alone, as Keras's optimizer skips them (AdamW would decay them)
    "unused P2 R2 M2 adamw": ("unused_output", 2, 2, "1f1b", "adamw weight_decay=0.5", 48, 16, False, 1),
    "int_boundary P4 M2": ("int_boundary", 4, 2, "1f1b", "sgd", 48, 16, False, 1),
    "ops_graph P2 R2 M2": ("ops_graph", 2, 2, "1f1b", "sgd", 48, 16, False, 1),
    # a language model whose per-token logits reuse its input embedding: tied across stages
    "tied_lm P4 M1": ("tied_lm", 4, 1, "1f1b", "sgd", 32, 16, False, 1),
    "tied_lm P2 R2 M2": ("tied_lm", 2, 2, "1f1b", "sgd", 32, 16, False, 1),
    # 50 samples, batch 18: 18 and 14 do not divide by 2 replicas x 4 micro-batches
    "uneven P2 R2 M4 adam": ("mlp", 2, 4, "1f1b", "adam", 50, 18, False, 1),
    "history P2 R2 M2 two epochs": ("mlp", 2, 2, "1f1b", "adam", 48, 16, False, 2),
    # activation recomputation: BatchNorm stages; an early head with regularizers and sample weights
    "recompute resnet_bn P4 M1 adam": ("resnet_bn", 4, 1, "1f1b", "adam", 48, 16, False, 1),
    "recompute multi_io P2 R2 M2 gpipe": ("multi_io", 2, 2, "gpipe", "sgd", 48, 16, True, 1),
    # one micro-batch, nothing to reduce: every stage's optimizer runs inside its recomputed backward
    "recompute unused P4 M1 adamw": ("unused_output", 4, 1, "1f1b", "adamw weight_decay=0.5", 48, 16, False, 1),
    "recompute int_boundary P4 M1 adam": ("int_boundary", 4, 1, "1f1b", "adam", 48, 16, False, 1),
    # global_clipnorm clips by the whole model's norm: summed over stages, tied weights once
    "global_clipnorm mlp P4 M4 adam": ("mlp", 4, 4, "1f1b", "adam global_clipnorm", 48, 16, False, 1),
    "global_clipnorm tied_lm P2 R2 M2": ("tied_lm", 2, 2, "1f1b", "sgd global_clipnorm", 32, 16, False, 1),
    # Keras clips an embedding's sparse gradient by the norm of its rows, one per token
    "global_clipnorm embedding P4 M2": ("shared_embedding", 4, 2, "1f1b", "adam global_clipnorm", 48, 16, False, 1),
    "global_clipnorm embedding P1 R4": ("shared_embedding", 1, 1, "1f1b", "sgd global_clipnorm", 48, 16, False, 1),
    "clipnorm embedding P2 R2 M2": ("shared_embedding", 2, 2, "1f1b", "sgd clipnorm", 48, 16, False, 1),
    # Keras's Adam and RMSprop square each row of a sparse gradient: the rows reach them
    "embedding P2 R2 M2 adam": ("shared_embedding", 2, 2, "1f1b", "adam", 48, 16, False, 1),
    "embedding P1 R4 M2 rmsprop": ("shared_embedding", 1, 2, "1f1b", "rmsprop", 48, 16, False, 1),
    "clipvalue embedding P4 M1": ("shared_embedding", 4, 1, "1f1b", "sgd clipvalue=0.01", 48, 16, False, 1),
    # interleaved 1F1B: P x 2 stages, rank p holding stages p and p + P
    "interleaved mlp P2 R2 M4 adam": ("mlp", 2, 4, "interleaved", "adam", 48, 16, False, 1),
    "interleaved resnet_bn P4 M1 sgd": ("resnet_bn", 4, 1, "interleaved", "sgd", 48, 16, False, 1),
    "interleaved densenet P2 R2 M2 adam": ("densenet", 2, 2, "interleaved", "adam", 48, 16, False, 1),
    "interleaved multi_io P2 R2 M2 sample weights": ("multi_io", 2, 2, "interleaved", "adam", 48, 16, True, 1),
    "interleaved tied_lm P2 R2 M2": ("tied_lm", 2, 2, "interleaved", "sgd", 32, 16, False, 1),
    "interleaved int_boundary P2 R2 M2": ("int_boundary", 2, 2, "interleaved", "sgd", 48, 16, False, 1),
    # an embedding tied between stages 0 and 2, both on rank 0 (one variable, two chunks' rows), clipped globally
    "interleaved embedding P2 R2": ("shared_embedding", 2, 2, "interleaved", "adam global_clipnorm", 48, 16, False, 1),
    # 3 micro-batches, not a multiple of 2 ranks: every forward first; uneven splits
    "interleaved uneven P2 R2 M3 adam": ("mlp", 2, 3, "interleaved", "adam", 50, 18, False, 1),
    "recompute interleaved resnet_bn P4 M1 adam": ("resnet_bn", 4, 1, "interleaved", "adam", 48, 16, False, 1),
}
# The cases run again under mpirun (tests/test_engine.py): each way ranks talk at least once
# (float and int activations, multiple outputs, tied and sparse-row gradient reductions, a
# weight without gradient, clip norms across stages, data parallelism alone, uneven splits,
# logs). Every case runs on loopback ranks (tests/test_loopback.py), the real engine too.
UNDER_MPI = [
    "mlp P4 M1 1f1b sgd",
    "mlp P2 R2 M2 gpipe adam",
    "mlp P1 R4 adam",
    "mlp P4 M4 1f1b adam",
    "resnet_bn P4 M1 sgd",
    "densenet P2 R2 M2 adam",
    "multi_io P4 M4 sample weights adam",
    "multi_io P1 R4 M2 sgd",
    "shared P2 R2 M2 adam",
    "nested P4 M2",
    "unused P2 R2 M2 adamw",
    "int_boundary P4 M2",
    "tied_lm P4 M1",
    "tied_lm P2 R2 M2",
    "uneven P2 R2 M4 adam",
    "history P2 R2 M2 two epochs",
    "global_clipnorm tied_lm P2 R2 M2",
    "global_clipnorm embedding P4 M2",
    "clipnorm embedding P2 R2 M2",
    "embedding P2 R2 M2 adam",
    "interleaved mlp P2 R2 M4 adam",
    "interleaved densenet P2 R2 M2 adam",
    "interleaved embedding P2 R2",
]
# Further hf.fit keywords of some cases.
FIT_KW: dict[str, dict] = {key: {"recompute": True} for key in CASES if key.startswith("recompute ")}


def compiled(name: str, optimizer: str):
    model = getattr(zoo, name)()
    n_out = len(model.outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kind, _, clip = optimizer.partition(" ")  # "adam clipnorm", "adamw weight_decay=0.5": one keyword
    name, _, value = clip.partition("=")
    kw = {name: float(value or 0.1)} if clip else {}
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, **kw) if kind == "sgd" else type(keras.optimizers.get(kind))(**kw),
        loss=[loss] * n_out if n_out > 1 else loss,
        loss_weights=[1.0, 0.5] if n_out > 1 else None,
        metrics=[["accuracy"]] * n_out if n_out > 1 else ["accuracy"],
    )
    return model


def data(key: str):
    name, _, _, _, optimizer, n, batch, weights, epochs = CASES[key]
    model = getattr(zoo, name)()
    xs, ys = zoo.sample_inputs(model, n), zoo.sample_targets(model, n)
    sw = np.random.default_rng(5).uniform(0.2, 2.0, n).astype("float32") if weights else None
    return (xs if len(xs) > 1 else xs[0]), (ys if len(ys) > 1 else ys[0]), sw


def fit(model, key: str, comm=None):
    """hf.fit of `model` as case `key` prescribes."""
    _, P, M, schedule, _, _, batch, _, epochs = CASES[key]
    x, y, sw = data(key)
    return hf.fit(
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
        comm=comm,
        **FIT_KW.get(key, {}),
    )


def compare(key: str, model, history) -> dict:
    """Train the plain-Keras reference of case `key`; how far `model` and `history` are from it."""
    name, _, _, _, optimizer, _, batch, _, epochs = CASES[key]
    x, y, sw = data(key)
    ref = compiled(name, optimizer)
    href = ref.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, sample_weight=sw)
    initial = compiled(name, optimizer).get_weights()
    return {
        "err": max(
            float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6))
            for a, b in zip(model.get_weights(), ref.get_weights())
        ),
        "moved": max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), initial)),
        "history": history.history,
        "ref_history": href.history,
    }
