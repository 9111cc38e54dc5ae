"""Built-in models for `hyparflow train` and the benchmarks: the CIFAR ResNets of He et
al. (ResNet-20/32/44/56/110, v1; ResNet-164/1001, pre-activation bottleneck), VGG-16,
an MLP and a small CNN, plus `module:function` for the user's own.

Keras builds functional graphs recursively, so very deep models exceed Python's default
recursion limit; `build` runs every builder on a thread with a large stack and a high
recursion limit, so users never touch either.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any

from hyparflow.errors import ConfigError


def run_deep(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run `fn` on a thread with a 1 GiB stack and a recursion limit to match."""
    result: dict[str, Any] = {}

    def target():
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, 200_000))
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e
        finally:
            sys.setrecursionlimit(old)

    previous = threading.stack_size(1 << 30)
    try:
        thread = threading.Thread(target=target, name="hyparflow-build")
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _resnet_v1(depth: int, input_shape, num_classes: int):
    import keras
    from keras import layers

    if (depth - 2) % 6:
        raise ConfigError(f"ResNet v1 depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}.")
    n = (depth - 2) // 6

    def conv_bn(x, filters, strides=1, relu=True):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, kernel_initializer="he_normal")(
            x
        )
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x) if relu else x

    inp = keras.Input(input_shape, name="image")
    x = conv_bn(inp, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(n):
            strides = 2 if stage > 0 and block == 0 else 1
            y = conv_bn(x, filters, strides)
            y = conv_bn(y, filters, relu=False)
            if strides != 1:
                x = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x)
            x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name=f"resnet{depth}")


def _resnet_preact(depth: int, input_shape, num_classes: int):
    """Pre-activation bottleneck ResNet (He et al. 2016): depth 9n+2, e.g. 164, 1001."""
    import keras
    from keras import layers

    if (depth - 2) % 9:
        raise ConfigError(f"pre-activation ResNet depth must be 9n+2 (164, 1001), got {depth}.")
    n = (depth - 2) // 9
    inp = keras.Input(input_shape, name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(n):
            strides = 2 if stage > 0 and block == 0 else 1
            pre = layers.ReLU()(layers.BatchNormalization()(x))
            shortcut = x if (block > 0) else layers.Conv2D(filters * 4, 1, strides=strides, use_bias=False)(pre)
            y = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(pre)
            y = layers.ReLU()(layers.BatchNormalization()(y))
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
            y = layers.ReLU()(layers.BatchNormalization()(y))
            y = layers.Conv2D(filters * 4, 1, use_bias=False)(y)
            x = layers.Add()([shortcut, y])
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(num_classes, name="logits")(x), name=f"resnet{depth}_preact")


def _vgg16(input_shape, num_classes: int):
    import keras
    from keras import layers

    inp = keras.Input(input_shape, name="image")
    x = inp
    for filters, reps in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(reps):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        if x.shape[1] > 1:
            x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    return keras.Model(inp, layers.Dense(num_classes, name="logits")(x), name="vgg16")


def _mlp(input_shape, num_classes: int, depth: int = 4, width: int = 128):
    import keras
    from keras import layers

    inp = keras.Input(input_shape, name="features")
    x = layers.Flatten()(inp) if len(input_shape) > 1 else inp
    for _ in range(depth):
        x = layers.Dense(width, activation="relu")(x)
    return keras.Model(inp, layers.Dense(num_classes, name="logits")(x), name=f"mlp{depth}")


def _cnn(input_shape, num_classes: int):
    """A small CNN for 8x8 digits or 28x28/32x32 images."""
    import keras
    from keras import layers

    inp = keras.Input(input_shape, name="image")
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inp)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(64, activation="relu")(x)
    return keras.Model(inp, layers.Dense(num_classes, name="logits")(x), name="cnn")


REGISTRY: dict[str, Callable[..., Any]] = {
    **{f"resnet{d}": functools.partial(_resnet_v1, d) for d in (20, 32, 44, 56, 110)},
    **{f"resnet{d}": functools.partial(_resnet_preact, d) for d in (164, 1001)},
    "vgg16": _vgg16,
    "mlp": _mlp,
    "cnn": _cnn,
}


def resolve(name: str) -> Callable[..., Any]:
    """A registry name, or `module:function` (called with input_shape, num_classes, **options)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model {name!r}: cannot import {attr} from {module} ({e}).") from e
    raise ConfigError(f"Unknown model {name!r}: use one of {sorted(REGISTRY)} or 'module:function'.")


def build(name: str, input_shape, num_classes: int, **options) -> Any:
    """Build a model by name on a deep stack (see module docstring). A user's
    `module:function` that takes no input shape / class count is called without them."""
    fn = resolve(name)
    args: tuple = (tuple(input_shape), int(num_classes))
    try:
        inspect.signature(fn).bind(*args, **options)
    except TypeError:
        args = ()
    except ValueError:  # no signature (a builtin): call as documented
        pass
    return run_deep(fn, *args, **options)
