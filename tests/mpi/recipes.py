"""Run on 4 ranks (2 partitions x 2 replicas): three keras-io examples as published, on offline
data, with only their fit / evaluate / predict lines going through `api`: hyparflow's on every
rank, then plain Keras's on rank 0 for the reference. Writes JSON results to argv[1] (rank 0).

The recipes (keras.io/examples): "Simple MNIST convnet" (vision/mnist_convnet), "Text
classification with Transformer" (nlp/text_classification_with_transformer) and "Timeseries
classification from scratch" (timeseries/timeseries_classification_from_scratch). Each keeps
its model, compile and call lines; only the data (generated or bundled, small) and the epoch
counts (scaled to 2 shared cores) differ, as each recipe's comments say.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile

import keras
import numpy as np
from keras import layers, ops
from mpi4py import MPI

import hyparflow as hf

rank = MPI.COMM_WORLD.Get_rank()
tmp = MPI.COMM_WORLD.bcast(tempfile.mkdtemp(prefix="hf-recipes-") if rank == 0 else None, root=0)
LAYOUT = {"num_partitions": 2, "num_microbatches": 2}  # x 2 replicas on 4 ranks


class HyparflowAPI:
    """The recipes' model calls as hyparflow's, on the 2 x 2 grid."""

    fit = functools.partial(hf.fit, **LAYOUT)
    evaluate = functools.partial(hf.evaluate, **LAYOUT)
    predict = functools.partial(hf.predict, **LAYOUT)


class KerasAPI:
    """The recipes' model calls exactly as published."""

    @staticmethod
    def fit(model, *args, **kwargs):
        return model.fit(*args, **kwargs)

    @staticmethod
    def evaluate(model, *args, **kwargs):
        return model.evaluate(*args, **kwargs)

    @staticmethod
    def predict(model, *args, **kwargs):
        return model.predict(*args, **kwargs)


def digits_as_mnist():
    """scikit-learn's bundled 8x8 digits in `mnist.load_data()`'s form: 28x28 uint8 images
    (each pixel repeated 3x3, padded by 2), 80% train / 20% test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.pad(np.kron(d.images, np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))
    images = (images * 255 / 16).astype("uint8")
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], d.target[order].astype("uint8")
    cut = int(0.8 * len(images))
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def mnist_convnet(api) -> dict:
    """keras.io/examples/vision/mnist_convnet."""
    keras.utils.set_random_seed(0)
    num_classes = 10
    input_shape = (28, 28, 1)
    # (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()  # needs a download
    (x_train, y_train), (x_test, y_test) = digits_as_mnist()
    x_train = x_train.astype("float32") / 255
    x_test = x_test.astype("float32") / 255
    x_train = np.expand_dims(x_train, -1)
    x_test = np.expand_dims(x_test, -1)
    y_train = keras.utils.to_categorical(y_train, num_classes)
    y_test = keras.utils.to_categorical(y_test, num_classes)
    model = keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(num_classes, activation="softmax"),
        ]
    )
    batch_size = 128
    epochs = 15  # as published: 15 epochs (of 1437 digits here, 60000 MNIST images there)
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    history = api.fit(model, x_train, y_train, batch_size=batch_size, epochs=epochs, validation_split=0.1)
    score = api.evaluate(model, x_test, y_test, verbose=0)
    predicted = api.predict(model, x_test, verbose=0)
    return outcome(history, score[1], predicted, y_test.argmax(-1))


class TransformerBlock(layers.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions


def reviews(n: int, vocab_size: int, maxlen: int, seed: int):
    """IMDB-like reviews: variable-length token lists (as `imdb.load_data` gives) over a Zipf-ish
    vocabulary, where a review's label is which of 50 "positive" or 50 "negative" words it uses
    more (6-9 of its label's kind, 0-2 of the other, all within the `maxlen` tokens kept)."""
    rng = np.random.default_rng(seed)
    positive, negative = np.arange(10, 60), np.arange(60, 110)
    y = rng.integers(0, 2, n)
    x = []
    for label in y:
        length = int(rng.integers(maxlen // 2, maxlen * 2))
        words = np.minimum(rng.zipf(1.3, length) + 109, vocab_size - 1)
        cues = rng.choice(positive if label else negative, 6 + int(rng.integers(0, 4)))
        noise = rng.choice(negative if label else positive, int(rng.integers(0, 3)))
        spots = rng.choice(min(length, maxlen), len(cues) + len(noise), replace=False)
        words[length - 1 - spots] = np.concatenate([cues, noise])
        x.append(words.tolist())
    return x, y


def text_transformer(api) -> dict:
    """keras.io/examples/nlp/text_classification_with_transformer."""
    keras.utils.set_random_seed(0)
    vocab_size = 2000  # published: 20000 (of IMDB's words)
    maxlen = 64  # published: 200
    # (x_train, y_train), (x_val, y_val) = keras.datasets.imdb.load_data(num_words=vocab_size)  # needs a download
    (x_train, y_train), (x_val, y_val) = reviews(1536, vocab_size, maxlen, 1), reviews(512, vocab_size, maxlen, 2)
    x_train = keras.utils.pad_sequences(x_train, maxlen=maxlen)
    x_val = keras.utils.pad_sequences(x_val, maxlen=maxlen)
    embed_dim = 32
    num_heads = 2
    ff_dim = 32
    inputs = layers.Input(shape=(maxlen,))
    embedding_layer = TokenAndPositionEmbedding(maxlen, vocab_size, embed_dim)
    x = embedding_layer(inputs)
    transformer_block = TransformerBlock(embed_dim, num_heads, ff_dim)
    x = transformer_block(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    epochs = 4  # published: 2 (of 25000 reviews)
    history = api.fit(model, x_train, y_train, batch_size=32, epochs=epochs, validation_data=(x_val, y_val))
    score = api.evaluate(model, x_val, y_val, verbose=0)
    predicted = api.predict(model, x_val, verbose=0)
    return outcome(history, score[1], predicted, y_val)


def waves(n: int, length: int, seed: int):
    """FordA-like series in `readucr`'s form (labels -1 / 1, each series z-normalised): noisy sines
    (-1) and noisy square waves (1) of random frequency and phase."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[None, :]
    y = rng.choice([-1, 1], n)
    freq, phase = rng.uniform(1 / 40, 1 / 10, (n, 1)), rng.uniform(0, 2 * np.pi, (n, 1))
    sine = np.sin(2 * np.pi * freq * t + phase)
    x = np.where(y[:, None] == 1, np.sign(sine), sine) + rng.normal(0, 0.3, sine.shape)
    return ((x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)).astype("float32"), y


def timeseries_classification(api, folder: str) -> dict:
    """keras.io/examples/timeseries/timeseries_classification_from_scratch."""
    keras.utils.set_random_seed(0)
    # x_train, y_train = readucr(root_url + "FordA_TRAIN.tsv")  # needs a download
    x_train, y_train = waves(3072, 64, 3)  # published: FordA, 3601 series of 500 steps
    x_test, y_test = waves(512, 64, 4)
    x_train = x_train.reshape((x_train.shape[0], x_train.shape[1], 1))
    x_test = x_test.reshape((x_test.shape[0], x_test.shape[1], 1))
    num_classes = len(np.unique(y_train))
    idx = np.random.permutation(len(x_train))
    x_train = x_train[idx]
    y_train = y_train[idx]
    y_train[y_train == -1] = 0
    y_test[y_test == -1] = 0

    def make_model(input_shape):
        input_layer = keras.layers.Input(input_shape)
        conv1 = keras.layers.Conv1D(filters=64, kernel_size=3, padding="same")(input_layer)
        conv1 = keras.layers.BatchNormalization()(conv1)
        conv1 = keras.layers.ReLU()(conv1)
        conv2 = keras.layers.Conv1D(filters=64, kernel_size=3, padding="same")(conv1)
        conv2 = keras.layers.BatchNormalization()(conv2)
        conv2 = keras.layers.ReLU()(conv2)
        conv3 = keras.layers.Conv1D(filters=64, kernel_size=3, padding="same")(conv2)
        conv3 = keras.layers.BatchNormalization()(conv3)
        conv3 = keras.layers.ReLU()(conv3)
        gap = keras.layers.GlobalAveragePooling1D()(conv3)
        output_layer = keras.layers.Dense(num_classes, activation="softmax")(gap)
        return keras.models.Model(inputs=input_layer, outputs=output_layer)

    model = make_model(input_shape=x_train.shape[1:])
    # published: 500, with early stopping after 50 epochs without progress; 8 epochs of 77 steps let
    # BatchNormalization's moving statistics (momentum 0.99) settle, which inference needs
    epochs = 8
    batch_size = 32
    best = os.path.join(folder, "best_model.keras")
    callbacks = [
        keras.callbacks.ModelCheckpoint(best, save_best_only=True, monitor="val_loss"),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=20, min_lr=0.0001),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=50, verbose=1),
    ]
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["sparse_categorical_accuracy"])
    history = api.fit(
        model,
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        callbacks=callbacks,
        validation_split=0.2,
        verbose=1,
    )
    model = keras.models.load_model(best)
    test_loss, test_acc = api.evaluate(model, x_test, y_test, verbose=0)
    predicted = api.predict(model, x_test, verbose=0)
    return outcome(history, test_acc, predicted, y_test)


def dropout_loss(api) -> float:
    """The recipes' Dropout in isolation: one training epoch of Dense(8) -> Dropout(0.5) ->
    Dense(1), all weights one, on ones against zeros, with a frozen optimizer. Without dropout the
    loss is exactly (8 * 8)^2 = 4096; with it, each of the 64 samples keeps a random share."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = layers.Dropout(0.5)(layers.Dense(8, kernel_initializer="ones")(inputs))
    model = keras.Model(inputs, layers.Dense(1, kernel_initializer="ones")(hidden))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = np.ones((64, 8), "float32"), np.zeros((64, 1), "float32")
    return api.fit(model, x, y, batch_size=64, epochs=1, verbose=0).history["loss"][0]


def outcome(history, accuracy: float, predicted: np.ndarray, labels: np.ndarray) -> dict:
    """What the test compares: evaluate's accuracy, predict's (from its class scores), and the history."""
    return {
        "accuracy": float(accuracy),
        "predict_accuracy": float(np.mean(predicted.argmax(-1) == labels)),
        "predict_shape": list(predicted.shape),
        "history": history.history,
    }


RECIPES = {
    "mnist_convnet": mnist_convnet,
    "text_transformer": text_transformer,
    "timeseries": functools.partial(timeseries_classification, folder=os.path.join(tmp, "hyparflow")),
}
if rank == 0:
    os.makedirs(os.path.join(tmp, "hyparflow"))
out = {name: {"hyparflow": recipe(HyparflowAPI)} for name, recipe in RECIPES.items()}
out["dropout_loss"] = {"hyparflow": dropout_loss(HyparflowAPI)}
if rank == 0:  # the references, after every hyparflow call (the other ranks are done by then)
    out["dropout_loss"]["keras"] = dropout_loss(KerasAPI)
    RECIPES["timeseries"] = functools.partial(timeseries_classification, folder=tempfile.mkdtemp(dir=tmp))
    for name, recipe in RECIPES.items():
        out[name]["keras"] = recipe(KerasAPI)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
