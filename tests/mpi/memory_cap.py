"""A model that does not fit one process: under a cap on each process's data memory
(RLIMIT_DATA, set after TensorFlow's start-up), `keras` runs plain `model.fit` in one
process and runs out of memory; `hyparflow PATH` trains the same model at P=4, each stage
keeping its state on its rank (gather="none"), and saves the whole model to PATH one
variable at a time. Prints TRAINED or OUT OF MEMORY.

RLIMIT_DATA counts address space reserved, not only memory touched: gathering the
weights on rank 0 reserves 256 MB more than it uses in some runs, so a cap that the
gather must fit under is not a test of memory held."""

import os
import resource
import sys

# oneDNN's allocator retries each failed allocation for 10 s (Keras took 100 s to fail); TensorFlow's fails at once
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import hyparflow as hf  # noqa: E402, F401  (imported alike in both modes: it sets the threads)

WIDTH, LAYERS = 1536, 16  # 38 M parameters: 151 MB of weights, about 600 MB with Adam and gradients
CAP_MB = 540  # added to the data memory at the cap: P=4's ranks peak near 370 MB, Keras near 800


def data_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmData")) / 1024


float(tf.reduce_sum(tf.ones(2)))
limit = int((data_mb() + CAP_MB) * 2**20)
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
try:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((WIDTH,))
    x = inputs
    for _ in range(LAYERS):
        x = keras.layers.Dense(WIDTH, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((128, WIDTH)).astype("float32"), rng.integers(0, 10, 128)
    if sys.argv[1] == "keras":
        history = model.fit(X, Y, batch_size=64, shuffle=False, verbose=0)
    else:
        history = hf.fit(model, X, Y, batch_size=64, shuffle=False, verbose=0, num_partitions=4, num_microbatches=2,
                         balance="params", gather="none")  # fmt: skip
        hf.save(model, sys.argv[2])
except (MemoryError, tf.errors.ResourceExhaustedError) as e:
    print(f"OUT OF MEMORY: {type(e).__name__}: {str(e)[:300]}", flush=True)
    sys.exit(3)
loss = history.history["loss"][-1]
assert np.isfinite(loss)
print(f"TRAINED: loss {loss:.4f} under a data memory cap of +{CAP_MB} MB", flush=True)
