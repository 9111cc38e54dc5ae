"""YAML run configurations for `hyparflow train` (safe-loaded; unknown keys are errors)."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from hyparflow.errors import ConfigError
from hyparflow.settings import positive_int

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "model": "cnn",  # a built-in name (hyparflow.models.REGISTRY) or module:function
    "model_options": {},
    "dataset": "digits",  # digits | synthetic | mnist | cifar10
    "dataset_options": {},  # synthetic: samples, shape, num_classes
    "batch_size": 64,  # global batch
    "epochs": 3,
    "steps_per_epoch": None,
    "optimizer": {"name": "adam", "learning_rate": 0.001},
    "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
    "metrics": ["accuracy"],
    "ranks": 1,  # world size when `hyparflow train` launches the job itself
    "partitions": 1,
    "replicas": None,  # default: ranks / partitions
    "microbatches": 1,
    "schedule": "1f1b",  # 1f1b | gpipe | interleaved
    "virtual_stages": None,  # stages a rank holds under interleaved (default 2)
    "balance": None,
    "placement": "pipeline",
    "checkpoint": None,  # {path: ..., every_epochs: 1, keep: 3}
    "seed": 0,
    "verbose": 2,  # Keras verbosity on rank 0: 2 prints one line per epoch
}


def load(path: str) -> dict[str, Any]:
    """Read a config file and merge it over DEFAULTS."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}; valid ones are {sorted(DEFAULTS)}.")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(raw)
    for key in ("batch_size", "epochs", "ranks", "partitions", "microbatches"):
        positive_int(f"config file {path}: {key}", cfg[key], minimum=0 if key == "epochs" else 1)
    if cfg["ranks"] % cfg["partitions"]:
        raise ConfigError(
            f"config file {path}: ranks={cfg['ranks']} is not a multiple of partitions={cfg['partitions']}."
        )
    return cfg
