"""hyparflow: hybrid-parallel (pipeline x data) training of Keras models over MPI."""

__version__ = "0.1.0"

from hyparflow.placement import configure_threads

# Before TensorFlow starts: each rank takes its share of the node's cores.
configure_threads()

from hyparflow.checkpoint import save
from hyparflow.errors import ConfigError
from hyparflow.partition import Plan, Stage, plan
from hyparflow.trainer import evaluate, fit, predict

__all__ = ["ConfigError", "Plan", "Stage", "evaluate", "fit", "plan", "predict", "save", "__version__"]
