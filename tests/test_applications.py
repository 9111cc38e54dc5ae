"""Every keras.applications constructor, found by walking the package (none hand-picked):
built with random weights at its smallest accepted input size, planned at P=2 and P=4,
and transparent (stagewise outputs and every variable's gradient equal the model's)."""

from __future__ import annotations

import gc
import inspect
import re

import keras
import pytest
from stagewise import check_transparent


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


def build(fn, classes=3):
    """The model at the smallest square input the constructor accepts: start at 32 pixels and
    grow to the smallest larger size its error message names."""
    size = 32
    while True:
        try:
            return fn(weights=None, input_shape=(size, size, 3), classes=classes), size
        except ValueError as e:
            larger = [int(n) for n in re.findall(r"\d+", str(e)) if int(n) > size]
            if not larger:
                raise
            size = min(larger)


def test_every_constructor_is_found():
    assert len(CONSTRUCTORS) >= 40 and {"ResNet50", "MobileNetV3Small", "ConvNeXtTiny", "NASNetMobile"} <= set(CONSTRUCTORS)


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_application_plans_and_is_transparent(name):
    keras.utils.set_random_seed(0)
    model, size = build(CONSTRUCTORS[name])
    assert isinstance(model, keras.Model)
    errors = check_transparent(model, [2, 4], n=2, regularization=False)  # plans at P=2 and P=4 with it
    summary = " ".join(f"P={p}: outputs {o:.1e} gradients {g:.1e}" for p, (o, g) in errors.items())
    print(f"\n{name} input {size}x{size} {model.count_params()} params, max relative errors {summary}")
    del model
    keras.backend.clear_session()
    gc.collect()
