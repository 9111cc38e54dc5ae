"""Every keras_hub text backbone, found by its constructor's arguments and built tiny with
random weights, nested under a pooled head on fixed-length inputs, trains at P=2 as plain
Keras does (tests/training.py: two SGD steps, every weight within 1e-4). Float64 where
keras_hub computes in it, float32 where it does not (its mixture-of-experts routers)."""

from __future__ import annotations

import inspect

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from training import train_like_keras

LENGTH = 12
# Tiny values for every required constructor argument a text backbone takes.
FILL = dict.fromkeys(("vocabulary_size", "vocab_size"), 40) | {
    "num_layers": 1,
    "num_layers_enc": 1,
    "num_layers_dec": 1,
    "num_heads": 2,
    "num_query_heads": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 16,
    "hidden_size": 16,
    "embedding_dim": 16,
    "intermediate_dim": 32,
    "head_dim": 8,
    "head_size": 8,
    "num_experts": 4,
    "moe_intermediate_dim": 16,
    "shared_expert_intermediate_dim": 16,
    "shared_expert_intermediate_size": 16,
    "top_k": 1,
}
OPTIONAL = {"max_sequence_length": 16, "dropout": 0.0} | {  # Qwen3.5's linear attention: 4096 wide unless told
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
}


def _required(cls) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in ("self", "kwargs")]


BACKBONES = {n: getattr(keras_hub.models, n) for n in dir(keras_hub.models) if n.endswith("Backbone")}
del BACKBONES["Backbone"]
TEXT = sorted(name for name, cls in BACKBONES.items() if all(p in FILL for p in _required(cls)))


def builder(name: str):
    cls = getattr(keras_hub.models, name)
    params = inspect.signature(cls.__init__).parameters
    kw = {p: FILL[p] for p in _required(cls)} | {p: v for p, v in OPTIONAL.items() if p in params}

    def build():
        keras.utils.set_random_seed(0)
        backbone = cls(**kw)
        spec = backbone.input if isinstance(backbone.input, dict) else {"inputs": backbone.input}
        shapes = {k: tuple(d or LENGTH for d in t.shape[1:]) for k, t in spec.items()}
        inputs = {k: keras.Input(shapes[k], dtype=t.dtype, name=k) for k, t in spec.items()}
        out = backbone(inputs if isinstance(backbone.input, dict) else inputs["inputs"])
        if isinstance(out, dict):
            out = out.get("sequence_output", next(v for v in out.values() if len(v.shape) == 3))
        logits = keras.layers.Dense(3, name="hf_head")(keras.layers.GlobalAveragePooling1D()(out))
        model = keras.Model(list(inputs.values()), logits)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
        return model

    return build


def data(model, n: int = 16):
    rng = np.random.default_rng(0)
    xs = []
    for t in model.inputs:
        shape = (n, *t.shape[1:])
        if "mask" in t.name:
            xs.append(np.ones(shape, "int32"))
        elif "int" in str(t.dtype):
            ids = "ids" in t.name and "segment" not in t.name
            xs.append((rng.integers(1, 40, shape) if ids else np.zeros(shape)).astype("int32"))
        else:
            xs.append(rng.standard_normal(shape))
    return xs, rng.integers(0, 3, n)


def test_the_text_backbones_are_found():
    assert len(TEXT) >= 30, TEXT
    assert {"BertBackbone", "GPT2Backbone", "LlamaBackbone", "T5Backbone", "MixtralBackbone"} <= set(TEXT)


@pytest.mark.parametrize("name", TEXT)
def test_backbone_trains_as_keras(name):
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    build = builder(name)
    try:
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")
        try:
            model = build()
            model(data(model)[0], training=True)
        except (TypeError, tf.errors.InvalidArgumentError):  # keras_hub computes some parts in float32 only
            keras.config.set_floatx("float32")
            keras.config.set_dtype_policy("float32")
            model = build()
        x, y = data(model)
        result = train_like_keras(build, x, y, 2)
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
    assert result.moved > 1e-3, result
    assert result.err < 1e-4, result
