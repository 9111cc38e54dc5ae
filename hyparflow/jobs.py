"""Training jobs described by a config (see hyparflow.config): what `hyparflow train` runs."""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("hyparflow")


def keras_object(kind: str, spec: Any) -> Any:
    """A Keras optimizer/loss from a name or {name: ..., **options} (e.g. {name: adam, learning_rate: 0.01})."""
    import keras

    module = getattr(keras, kind)
    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name")
        class_name = "".join(part.capitalize() for part in re.split(r"[_\s]+", name)) if name.islower() else name
        class_name = {"Sgd": "SGD", "Rmsprop": "RMSprop", "Adamw": "AdamW"}.get(class_name, class_name)
        return module.get({"class_name": class_name, "config": options})
    return module.get(spec)


def train_from_config(cfg: dict[str, Any]) -> dict[str, float]:
    """Build the model and data, train with hyparflow.fit, evaluate; returns the test logs."""
    import keras
    from mpi4py import MPI

    import hyparflow as hf
    from hyparflow import data, models

    rank = MPI.COMM_WORLD.Get_rank()
    keras.utils.set_random_seed(cfg["seed"])
    x, y, xv, yv, classes = data.load(cfg["dataset"], seed=cfg["seed"], **cfg["dataset_options"])
    model = models.build(cfg["model"], x.shape[1:], classes, **cfg["model_options"])
    model.compile(
        optimizer=keras_object("optimizers", cfg["optimizer"]),
        loss=keras_object("losses", cfg["loss"]),
        metrics=list(cfg["metrics"]),
    )
    if rank == 0:
        print(
            f"{cfg['name']}: {model.name} ({model.count_params():,} parameters) on {cfg['dataset']} "
            f"({len(x)} train / {len(xv)} test), {MPI.COMM_WORLD.Get_size()} ranks = "
            f"{cfg['partitions']} partitions x {MPI.COMM_WORLD.Get_size() // cfg['partitions']} replicas, "
            f"{cfg['microbatches']} micro-batches, {cfg['schedule']}",
            flush=True,
        )
    grid = dict(
        num_partitions=cfg["partitions"],
        num_replicas=cfg["replicas"],
        num_microbatches=cfg["microbatches"],
        balance=cfg["balance"],
    )
    ckpt = cfg.get("checkpoint") or {}
    hf.fit(
        model,
        x,
        y,
        batch_size=cfg["batch_size"],
        epochs=cfg["epochs"],
        steps_per_epoch=cfg["steps_per_epoch"],
        schedule=cfg["schedule"],
        virtual_stages=cfg["virtual_stages"],
        placement_policy=cfg["placement"],
        validation_data=(xv, yv),
        seed=cfg["seed"],
        verbose=cfg["verbose"] if rank == 0 else 0,
        checkpoint_dir=ckpt.get("path"),
        checkpoint_every=ckpt.get("every_epochs", 1),
        checkpoint_keep=ckpt.get("keep", 3),
        resume=bool(ckpt.get("resume", True)),
        **grid,
    )
    logs = hf.evaluate(model, xv, yv, batch_size=cfg["batch_size"], verbose=0, return_dict=True, **grid)
    if rank == 0:
        print(
            f"final test accuracy: {logs.get('accuracy', float('nan')):.4f}  test loss: {logs['loss']:.4f}", flush=True
        )
    return logs
