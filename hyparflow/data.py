"""Datasets for `hyparflow train` and the benchmarks.

`digits` (scikit-learn's bundled 8x8 digits) and `synthetic` work offline; `mnist` and
`cifar10` use the Keras loaders, which download on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hyparflow.errors import ConfigError

DATASETS = ("digits", "synthetic", "mnist", "cifar10")


def load(
    name: str,
    *,
    shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    samples: int = 1024,
    seed: int = 0,
    test_fraction: float = 0.2,
):
    """Returns (x_train, y_train, x_test, y_test, num_classes); images are channels-last float32."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[..., None]
        y = d.target.astype(np.int64)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(x))
        x, y = x[order], y[order]
        cut = int(len(x) * (1 - test_fraction))
        return x[:cut], y[:cut], x[cut:], y[cut:], 10
    if name == "synthetic":
        # Class-dependent means plus noise: learnable, deterministic, any shape.
        rng = np.random.default_rng(seed)
        n = samples + int(samples * test_fraction)
        centers = rng.standard_normal((num_classes,) + tuple(shape)).astype(np.float32)
        y = rng.integers(0, num_classes, n)
        x = centers[y] * 0.5 + rng.standard_normal((n,) + tuple(shape)).astype(np.float32)
        return x[:samples], y[:samples], x[samples:], y[samples:], num_classes
    if name in ("mnist", "cifar10"):
        import keras

        (xt, yt), (xv, yv) = getattr(keras.datasets, name).load_data()
        xt, xv = (a.astype(np.float32) / 255.0 for a in (xt, xv))
        if xt.ndim == 3:
            xt, xv = xt[..., None], xv[..., None]
        return xt, yt.reshape(-1).astype(np.int64), xv, yv.reshape(-1).astype(np.int64), 10
    raise ConfigError(f"Unknown dataset {name!r}: use one of {DATASETS}.")
