"""hyparflow: hybrid-parallel (pipeline x data) training of Keras models over MPI."""

__version__ = "0.1.0"

from hyparflow.placement import configure_threads

# Before TensorFlow starts: each rank takes its share of the node's cores, and
# TensorFlow's start-up lines stay off the console.
configure_threads()

from hyparflow.console import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

from hyparflow import failures  # noqa: E402

# In a multi-rank job, an uncaught exception anywhere in the script ends every rank.
failures.install()

from hyparflow.checkpoint import save  # noqa: E402
from hyparflow.errors import ConfigError  # noqa: E402
from hyparflow.partition import Plan, Stage, plan  # noqa: E402
from hyparflow.replicas import InputContext, PerReplica  # noqa: E402
from hyparflow.trainer import evaluate, fit, predict  # noqa: E402

__all__ = [
    "ConfigError",
    "InputContext",
    "PerReplica",
    "Plan",
    "Stage",
    "evaluate",
    "fit",
    "plan",
    "predict",
    "save",
    "__version__",
]
