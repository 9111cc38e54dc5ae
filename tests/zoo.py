"""A zoo of Keras graphs that partitioning must handle, with matching random data.

Each builder seeds Keras, so building twice gives identical initial weights: the MPI
tests train one copy with hyparflow and one with plain Keras and compare.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops


def mlp(seed=0, depth=10):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12,), name="x")
    x = inp
    for _ in range(depth):
        x = layers.Dense(16, activation="tanh")(x)
    return keras.Model(inp, layers.Dense(4, name="out")(x), name="mlp")


def resnet_bn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="x")
    x = layers.Conv2D(8, 3, padding="same")(inp)
    for filters in (8, 16):
        y = layers.Conv2D(filters, 3, padding="same", strides=1 if filters == 8 else 2)(x)
        y = layers.BatchNormalization()(y)
        y = layers.ReLU()(y)
        y = layers.Conv2D(filters, 3, padding="same")(y)
        y = layers.BatchNormalization()(y)
        if filters != 8:
            x = layers.Conv2D(filters, 1, strides=2)(x)
        x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(4, name="out")(x), name="resnet_bn")


def dropout_bn(seed=0):
    """Dropout and BatchNormalization on every stage: a recomputed forward must draw the
    same masks and must not move the statistics twice."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12,), name="x")
    x = inp
    for _ in range(4):
        x = layers.Dense(16, activation="relu")(x)
        x = layers.BatchNormalization(momentum=0.5)(x)
        x = layers.Dropout(0.3)(x)
    return keras.Model(inp, layers.Dense(4, name="out")(x), name="dropout_bn")


def densenet(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 4), name="x")
    feats = [layers.Conv2D(4, 3, padding="same")(inp)]
    for _ in range(4):
        x = feats[0] if len(feats) == 1 else layers.Concatenate()(feats)
        feats.append(layers.Conv2D(4, 3, padding="same", activation="relu")(x))
    x = layers.GlobalAveragePooling2D()(layers.Concatenate()(feats))
    return keras.Model(inp, layers.Dense(4, name="out")(x), name="densenet")


def multi_io(seed=0):
    """Two inputs (one used only late), an early auxiliary head, regularizers."""
    keras.utils.set_random_seed(seed)
    a = keras.Input((10,), name="a")
    b = keras.Input((6,), name="b")
    x = layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.l2(1e-2))(a)
    aux = layers.Dense(3, name="aux")(x)
    for _ in range(4):
        x = layers.Dense(16, activation="tanh", activity_regularizer=keras.regularizers.l1(1e-3))(x)
    x = layers.Concatenate()([x, layers.Dense(8)(b)])
    main = layers.Dense(4, name="main", kernel_regularizer=keras.regularizers.l1(1e-3))(x)
    return keras.Model([a, b], [main, aux], name="multi_io")


def shared(seed=0):
    """One Dense layer called at two places (siamese), with layers in between."""
    keras.utils.set_random_seed(seed)
    a = keras.Input((8,), name="a")
    b = keras.Input((8,), name="b")
    enc = layers.Dense(8, activation="tanh", name="shared_enc")
    ea = enc(a)
    x = layers.Dense(8, activation="relu")(ea)
    x = layers.Dense(8, activation="relu")(x)
    eb = enc(layers.Add()([b, x]))
    x = layers.Concatenate()([x, eb])
    for _ in range(3):
        x = layers.Dense(8, activation="relu")(x)
    return keras.Model([a, b], layers.Dense(3, name="out")(x), name="shared")


def nested(seed=0):
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, layers.Dense(8, activation="relu")(layers.Dense(8)(inner_in)), name="inner")
    inp = keras.Input((6,), name="x")
    x = layers.Dense(8)(inp)
    x = inner(x)
    x = layers.Dense(8, activation="relu")(x)
    x = layers.Dense(8, activation="relu")(x)
    return keras.Model(inp, layers.Dense(3, name="out")(x), name="nested")


def sequential(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((10,)),
            layers.Dense(16, activation="relu"),
            layers.Dense(16, activation="relu"),
            layers.Dropout(0.0),
            layers.Dense(16),
            layers.Dense(3),
        ],
        name="sequential",
    )


def int_boundary(seed=0):
    """An int mask made early and used late: a non-float tensor crosses the cuts."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((7,), dtype="int32", name="ids")
    mask = layers.Lambda(lambda t: ops.cast(ops.greater(t, 0), "int32"), name="mask")(ids)
    x = layers.Embedding(20, 6)(ids)
    x = layers.Dense(6, activation="tanh")(x)
    x = layers.Dense(6, activation="tanh")(x)
    x = layers.Lambda(lambda v: v[0] * ops.cast(ops.expand_dims(v[1], -1), "float32"), name="apply_mask")([x, mask])
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, layers.Dense(3, name="out")(x), name="int_boundary")


def ops_graph(seed=0):
    """Plain ops between the layers (`x + 3.0`, `x * y`, ops.mean, ops.concatenate, ...):
    graph nodes that are no layers, on both sides of every cut."""
    keras.utils.set_random_seed(seed)
    a = keras.Input((6,), name="a")
    b = keras.Input((6,), name="b")
    x = layers.Dense(8)(a) + 3.0
    y = layers.Dense(8)(b) * x
    z = ops.concatenate([x, y, ops.mean(y, axis=-1, keepdims=True)], axis=-1)
    z = layers.Dense(8)(ops.tanh(z))
    z = z * ops.sigmoid(z) - ops.mean(z, axis=-1, keepdims=True)
    return keras.Model([a, b], layers.Dense(3, name="out")(z), name="ops_graph")


def nested_deep(seed=0):
    """A functional block (with BatchNorm) nested in another nested model and also called at
    the top with training=False, beside a nested Sequential with Dropout."""
    keras.utils.set_random_seed(seed)
    i = keras.Input((8,))
    normalized = layers.BatchNormalization()(layers.Dense(8)(i))
    block = keras.Model(i, layers.Dense(8, activation="tanh")(normalized), name="block")
    j = keras.Input((8,))
    middle = keras.Model(j, block(layers.Dense(8)(j)) + j, name="middle")
    seq = keras.Sequential(
        [keras.Input((8,)), layers.Dense(8, activation="relu"), layers.Dropout(0.3), layers.Dense(8)],
        name="seq",
    )
    inp = keras.Input((6,), name="x")
    x = middle(layers.Dense(8)(inp))
    x = seq(block(x, training=False))
    return keras.Model(inp, layers.Dense(3, name="out")(x), name="nested_deep")


ZOO_MODELS = (mlp, resnet_bn, densenet, multi_io, shared, nested, sequential, int_boundary, ops_graph, nested_deep)
ZOO = {f.__name__: f for f in ZOO_MODELS}


# ---- sequence models: their int inputs are padded token ids (see padded_tokens) ------------
def masked_seq(seed=0, length=7, vocab=20):
    """Keras implicit masks: Embedding(mask_zero=True) -> LSTM -> MultiHeadAttention -> GRU."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((length,), dtype="int32", name="ids")
    x = layers.Embedding(vocab, 8, mask_zero=True)(ids)
    x = layers.LSTM(8, return_sequences=True)(x)
    x = layers.Dense(8)(x)
    x = layers.Add()([x, layers.MultiHeadAttention(2, 4)(x, x)])
    x = layers.GRU(8)(x)
    return keras.Model(ids, layers.Dense(3, name="out")(x), name="masked_seq")


def unused_output(seed=0):
    """A nested model with two outputs, one unused: its Dense layer's weights get no
    gradient (as a keras_hub backbone's pooler does under a per-token head)."""
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((8,))
    h = layers.Dense(8, activation="tanh")(inner_in)
    inner = keras.Model(inner_in, [layers.Dense(8, activation="tanh")(h), layers.Dense(4, name="unused")(h)])
    inp = keras.Input((6,), name="x")
    x = layers.Dense(8, activation="relu")(inp)
    x, _ = inner(x)
    for _ in range(3):
        x = layers.Dense(8, activation="relu")(x)
    return keras.Model(inp, layers.Dense(3, name="out")(x), name="unused_output")


def shared_embedding(seed=0, length=6, vocab=20):
    """One Embedding called on two token inputs, the second call deep in the model, beside
    an untied one: gradients that reach the optimizer as IndexedSlices, one row per token."""
    keras.utils.set_random_seed(seed)
    ids_a = keras.Input((length,), dtype="int32", name="ids_a")
    ids_b = keras.Input((length,), dtype="int32", name="ids_b")
    emb = layers.Embedding(vocab, 8, name="shared_embedding")
    x = layers.Add()([emb(ids_a), layers.Embedding(vocab, 8, name="own_embedding")(ids_a)])
    for _ in range(3):
        x = layers.Dense(8, activation="tanh")(x)
    x = layers.Add()([x, emb(ids_b)])
    for _ in range(2):
        x = layers.Dense(8, activation="tanh")(x)
    return keras.Model([ids_a, ids_b], layers.Dense(5, name="out")(x), name="shared_embedding")


def tied_lm(seed=0, length=8, vocab=30):
    """A keras_hub decoder-only language model whose logits reuse its input embedding
    (ReversibleEmbedding called with reverse=True): weight tying across the model."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    ids = keras.Input((length,), dtype="int32", name="token_ids")
    pad = keras.Input((length,), dtype="int32", name="padding_mask")
    l2 = keras.regularizers.l2(1e-3)
    emb = keras_hub.layers.ReversibleEmbedding(vocab, 16, embeddings_regularizer=l2, name="tied_embedding")
    x = emb(ids)
    x = x + keras_hub.layers.PositionEmbedding(length)(x)
    for _ in range(2):
        x = keras_hub.layers.TransformerDecoder(32, 2)(x, decoder_padding_mask=pad)
    x = layers.LayerNormalization()(x)
    return keras.Model([ids, pad], emb(x, reverse=True), name="tied_lm")


def hub_causal_lm(seed=0, length=8, vocab=30):
    """A keras_hub task model (GPT2CausalLM: a backbone nested in a task whose logits reuse
    the backbone's token embedding), built for any length and called on fixed-length inputs."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=length,
        dropout=0.0,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    ids = keras.Input((length,), dtype="int32", name="token_ids")
    pad = keras.Input((length,), dtype="int32", name="padding_mask")
    return keras.Model([ids, pad], lm({"token_ids": ids, "padding_mask": pad}), name="hub_causal_lm")


def bert_with_head(seed=0, dropout=0.1):
    """A tiny keras_hub BertBackbone (random weights) nested under a Dense head."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
        dropout=dropout,
    )
    names = ("token_ids", "segment_ids", "padding_mask")
    inputs = {name: keras.Input((8,), dtype="int32", name=name) for name in names}
    out = backbone(inputs)
    return keras.Model(list(inputs.values()), layers.Dense(3)(out["pooled_output"]))


def padded_tokens(model, n: int, seed: int = 0) -> list[np.ndarray]:
    """Token ids padded with zeros after a random length, and a padding mask when the model
    takes one (its second input)."""
    rng = np.random.default_rng(seed)
    length = int(model.inputs[0].shape[1])
    lengths = rng.integers(1, length + 1, n)
    keep = np.arange(length)[None, :] < lengths[:, None]
    ids = (rng.integers(1, 20, (n, length)) * keep).astype("int32")
    return [ids, keep.astype("int32")][: len(model.inputs)]


def sample_inputs(model, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for t in model.inputs:
        shape = (n,) + tuple(t.shape[1:])
        out.append(
            rng.integers(0, 20, shape).astype("int32")
            if "int" in str(t.dtype)
            else rng.standard_normal(shape).astype("float32")
        )
    return out


def sample_targets(model, n: int, seed: int = 1) -> list[np.ndarray]:
    """Integer class labels for each output (the zoo's outputs are logits): one per sample,
    or one per token for sequence logits."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, int(t.shape[-1]), (n,) + tuple(t.shape[1:-1])) for t in model.outputs]
