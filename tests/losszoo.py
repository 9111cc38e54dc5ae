"""Models whose losses are not one number per sample (per token, per pixel, masked), with
matching data: the zoo for the loss-semantics tests. Builders seed Keras, so building
twice gives identical initial weights."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

VOCAB, SEQ = 13, 6


class PadMask(layers.Layer):
    """Passes logits through and masks them where an explicit int padding input is 0."""

    def call(self, inputs):
        return inputs[0]

    def compute_mask(self, inputs, previous_mask=None):
        return ops.not_equal(inputs[1], 0)


class Penalty(layers.Layer):
    """Adds a per-element mean penalty on its input with add_loss (a batch mean, as hyparflow assumes)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x):
        self.add_loss(0.1 * ops.mean(ops.square(x)))
        return x


def causal_lm(seed=0, mask="zero", penalty=False):
    """Embedding + causal self-attention + dense stack -> logits (batch, SEQ, VOCAB).
    mask="zero": padding id 0 masks via Embedding(mask_zero=True); "explicit": an int
    input 'pad' masks the logits at the end (so no mask crosses a stage boundary);
    None: unmasked (padding left to sample weights). penalty: an add_loss layer inside."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((SEQ,), dtype="int32", name="ids")
    inputs = [ids]
    x = layers.Embedding(VOCAB, 8, mask_zero=mask == "zero", name="embed")(ids)
    x = layers.MultiHeadAttention(2, 4, name="attn")(x, x, use_causal_mask=True)
    x = layers.LayerNormalization(name="norm")(x)
    x = layers.Dense(16, activation="relu", name="ff1")(x)
    if penalty:
        x = Penalty(name="penalty")(x)
    x = layers.Dense(8, activation="tanh", name="ff2")(x)
    out = layers.Dense(VOCAB, name="logits")(x)
    if mask == "explicit":
        pad = keras.Input((SEQ,), dtype="int32", name="pad")
        inputs.append(pad)
        out = PadMask(name="masked")([out, pad])
    return keras.Model(inputs, out, name=f"lm_{mask}")


def lm_data(n, seed=0, explicit=False):
    """Token ids with trailing padding (id 0), next-token targets, and the int padding mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (n, SEQ)).astype("int32")
    lengths = rng.integers(2, SEQ + 1, n)
    pad = (np.arange(SEQ)[None, :] < lengths[:, None]).astype("int32")
    ids *= pad
    targets = np.concatenate([ids[:, 1:], np.zeros((n, 1), "int32")], axis=1)
    return ([ids, pad] if explicit else ids), targets, pad


def unet(seed=0, classes=3):
    """A small U-Net: per-pixel logits (batch, 8, 8, classes), skips across the cuts."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 2), name="image")
    e1 = layers.Conv2D(4, 3, padding="same", activation="relu", name="enc1")(inp)
    e2 = layers.Conv2D(8, 3, padding="same", activation="relu", name="enc2")(layers.MaxPooling2D(name="down1")(e1))
    b = layers.Conv2D(8, 3, padding="same", activation="relu", name="bottom")(layers.MaxPooling2D(name="down2")(e2))
    d2 = layers.Concatenate(name="skip2")([layers.UpSampling2D(name="up2")(b), e2])
    d2 = layers.Conv2D(8, 3, padding="same", activation="relu", name="dec2")(d2)
    d1 = layers.Concatenate(name="skip1")([layers.UpSampling2D(name="up1")(d2), e1])
    d1 = layers.Conv2D(4, 3, padding="same", activation="relu", name="dec1")(d1)
    return keras.Model(inp, layers.Conv2D(classes, 1, name="seg")(d1), name="unet")


def unet_data(n, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8, 8, 2)).astype("float32"), rng.integers(0, classes, (n, 8, 8))


def seq2seq(seed=0):
    """Encoder ids and decoder ids (two inputs) -> decoder logits; the decoder input joins
    after the encoder. The target's padding (0) is masked by the loss's ignore_class."""
    keras.utils.set_random_seed(seed)
    src = keras.Input((SEQ,), dtype="int32", name="source")
    dec = keras.Input((SEQ - 1,), dtype="int32", name="decoder")
    x = layers.Embedding(VOCAB, 8, name="src_embed")(src)
    x = layers.Dense(8, activation="tanh", name="enc")(x)
    ctx = layers.GlobalAveragePooling1D(name="pool")(x)
    ctx = layers.RepeatVector(SEQ - 1, name="repeat")(layers.Dense(8, activation="tanh", name="ctx")(ctx))
    y = layers.Embedding(VOCAB, 8, name="dec_embed")(dec)
    y = layers.Concatenate(name="join")([y, ctx])
    y = layers.Dense(16, activation="relu", name="dec1")(y)
    return keras.Model([src, dec], layers.Dense(VOCAB, name="out")(y), name="seq2seq")


def seq2seq_data(n, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, VOCAB, (n, SEQ)).astype("int32")
    tgt = rng.integers(1, VOCAB, (n, SEQ)).astype("int32")
    tgt *= np.arange(SEQ)[None, :] < rng.integers(2, SEQ + 1, n)[:, None]
    return [src, tgt[:, :-1]], tgt[:, 1:]


def saturated_softmax(seed=0):
    """A softmax head whose probabilities saturate: crossentropy with from_logits=False
    must use the logits behind it (`_keras_logits`), or the clipped loss is far off."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), name="x")
    h = layers.Dense(8, activation="tanh", name="h1")(inp)
    h = layers.Dense(8, activation="tanh", name="h2")(h)
    init = keras.initializers.RandomNormal(stddev=40.0, seed=seed)
    return keras.Model(inp, layers.Dense(5, activation="softmax", kernel_initializer=init, name="probs")(h))
