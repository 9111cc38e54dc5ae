"""Every keras.applications constructor, found by walking the package (none hand-picked),
built with random weights at its smallest accepted input size and planned at P=2 and P=4.

Those up to TRAIN_MAX_PARAMS parameters train 2 SGD steps at P=4, M=1 through the loopback
engine and must equal plain Keras `fit` (every weight, BatchNorm statistics included). They
train in float64: at these tiny inputs, BatchNorm in training mode over 1x1 and 2x2 maps
of 8 samples amplifies float32 rounding so much that Keras differs from itself by up to
100% when a batch's rows are merely reordered, which no tolerance can test through; in
float64 that noise floor stays below 1e-6 (at most 2e-8 measured over the whole family),
so the 1e-4 bound is far above noise and far below any real error. Dropout rates are set
to zero (masks are drawn per process).

Larger constructors, up to STAGEWISE_MAX_PARAMS, are checked stagewise at P=4 instead: stage
by stage, outputs and every variable's gradient equal the whole model's. The rest are planned
at P=2 and P=4 only, to keep the suite within CI's time on two cores.
HYPARFLOW_APPLICATIONS_TRAIN_MAX and HYPARFLOW_APPLICATIONS_STAGEWISE_MAX raise the caps (the
whole family: `...TRAIN_MAX=1e8 ...STAGEWISE_MAX=inf`, about two hours and 20 GB here)."""

from __future__ import annotations

import gc
import inspect
import os
import re

import keras
import numpy as np
import pytest
from stagewise import check_transparent
from training import train_like_keras

import hyparflow as hf

TRAIN_MAX_PARAMS = float(os.environ.get("HYPARFLOW_APPLICATIONS_TRAIN_MAX", 3_500_000))
STAGEWISE_MAX_PARAMS = float(os.environ.get("HYPARFLOW_APPLICATIONS_STAGEWISE_MAX", 10_000_000))
TOLERANCE = 1e-4


def constructors() -> dict:
    """Public model constructors of keras.applications and its submodules, by name."""
    apps = keras.applications
    sources = [apps] + [getattr(apps, n) for n in dir(apps) if inspect.ismodule(getattr(apps, n))]
    found = {}
    for source in sources:
        for name in dir(source):
            fn = getattr(source, name)
            if name[:1].isupper() and inspect.isfunction(fn) and "weights" in inspect.signature(fn).parameters:
                found.setdefault(name, fn)
    return dict(sorted(found.items()))


CONSTRUCTORS = constructors()


def build(fn, classes=3, size=32):
    """The model at the smallest square input the constructor accepts: start at `size` pixels
    and grow to the smallest larger size its error message names."""
    while True:
        try:
            return fn(weights=None, input_shape=(size, size, 3), classes=classes), size
        except ValueError as e:
            larger = [int(n) for n in re.findall(r"\d+", str(e)) if int(n) > size]
            if not larger:
                raise
            size = min(larger)


def trainable_copy(fn, size):
    """A seeded float64 copy without dropout, compiled with plain SGD."""
    keras.utils.set_random_seed(0)
    model, _ = build(fn, size=size)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    return model


def test_every_constructor_is_found():
    assert len(CONSTRUCTORS) >= 40 and {"ResNet50", "MobileNetV3Small", "ConvNeXtTiny", "NASNetMobile"} <= set(
        CONSTRUCTORS
    )


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_application(name, request):
    keras.utils.set_random_seed(0)
    model, size = build(CONSTRUCTORS[name])
    params = model.count_params()
    for parts in (2, 4):
        plan = hf.plan(model, parts, balance="flops")
        assert plan.num_partitions == parts and all(s.calls for s in plan.stages)
        assert sum(len(s.calls) for s in plan.stages) == len(plan.graph)
    if params > STAGEWISE_MAX_PARAMS:
        print(f"\n{name} {size}px {params} params: planned at P=2 and P=4")
    elif params > TRAIN_MAX_PARAMS:
        errors = check_transparent(model, [4], n=2, regularization=False)
        print(
            f"\n{name} {size}px {params} params, stagewise P=4: outputs {errors[4][0]:.1e} gradients {errors[4][1]:.1e}"
        )
    else:
        del model
        request.getfixturevalue("float64")
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((16, size, size, 3)), rng.integers(0, 3, 16)
        r = train_like_keras(lambda: trainable_copy(CONSTRUCTORS[name], size), x, y, num_partitions=4)
        print(f"\n{name} {size}px {params} params, trained P=4 M=1: {r}")
        assert r.floor < TOLERANCE / 100 and r.moved > 1e-3, r  # the bound is far above Keras's own noise
        assert r.err < TOLERANCE, r
    keras.backend.clear_session()
    gc.collect()
