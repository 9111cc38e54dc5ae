"""`hyparflow.fit`, `evaluate` and `predict`: Keras's calls, run across a grid of
`num_replicas x num_partitions` MPI ranks.

Every rank holds the same compiled model and the same data; each reads only its
replica's slice of every global batch and only the inputs and targets its stage needs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np

from hyparflow import checkpoint, inputs, loop
from hyparflow.callbacks import Callbacks
from hyparflow.checkpoint import broadcast_variables, gather_stages
from hyparflow.errors import ConfigError
from hyparflow.failures import distributed, phase
from hyparflow.graph import np_dtype
from hyparflow.session import Session
from hyparflow.settings import Layout, positive_int
from hyparflow.transport import Transport


@contextlib.contextmanager
def _session(model, comm, announce: bool = False, balance=None, memory_limit=None, **layout: Any) -> Iterator[Session]:
    """Open a session on `comm` (default: MPI's world) for one call, and close it after."""
    transport = Transport(comm)
    session = Session(model, Layout.resolve(transport.size, **layout), balance, memory_limit, transport, announce)
    try:
        yield session
    finally:
        session.close()


def fit(
    model,
    x=None,
    y=None,
    *,
    batch_size: int = 32,
    epochs: int = 1,
    num_partitions: int | None = None,
    num_replicas: int | None = None,
    num_microbatches: int | None = None,
    schedule: str | None = None,
    balance: str | Sequence[int] | Sequence[str] | None = None,
    memory_limit: float | None = None,
    placement_policy: str = "pipeline",
    shuffle: bool = True,
    seed: int = 0,
    verbose: str | int = "auto",
    callbacks: Sequence[Any] | None = None,
    validation_data=None,
    validation_split: float = 0.0,
    sample_weight=None,
    class_weight: dict | None = None,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    gather: str = "rank0",
    resume_from: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    checkpoint_keep: int = 3,
    resume: bool = True,
    comm=None,
) -> keras.callbacks.History:
    """Train `model` like `model.fit`, split into `num_partitions` pipeline stages and
    `num_replicas` data-parallel replicas (default: world size / num_partitions).
    Settings left as None come from HYPARFLOW_PARTITIONS / _REPLICAS / _MICROBATCHES /
    _SCHEDULE (what `hyparflow run` passes), else 1 partition, 1 micro-batch, 1F1B.

    `batch_size` is the global batch. Each replica's share is cut into
    `num_microbatches` micro-batches; batches that do not divide evenly are split as
    evenly as possible and weighted exactly. On return, rank 0's model holds all trained
    weights (`gather="all"`: every rank's does).

    Checkpoints: `resume_from` loads a `.keras` file (weights and optimizer state, any
    layout) before training. `checkpoint_dir` writes `epoch-NNNNN.keras` every
    `checkpoint_every` epochs, keeps the newest `checkpoint_keep`, and (with `resume`)
    starts from the newest checkpoint rank 0 can read, continuing at its epoch.
    `comm`: an mpi4py communicator, or a `hyparflow.loopback` one (default: the world).
    """
    batch_size = positive_int("batch_size", batch_size, what=" (the global batch)")
    epochs = positive_int("epochs", epochs, minimum=0)
    if gather not in ("rank0", "all"):
        raise ConfigError(f"gather={gather!r}: expected 'rank0' or 'all'.")
    if steps_per_epoch is not None:
        steps_per_epoch = positive_int("steps_per_epoch", steps_per_epoch)
    layout = dict(num_partitions=num_partitions, num_replicas=num_replicas, num_microbatches=num_microbatches,
                  schedule=schedule, placement=placement_policy)
    with _session(model, comm, True, balance, memory_limit, **layout) as session:
        graph, transport = session.plan.graph, session.transport
        train = inputs.source(graph, x, y, sample_weight, class_weight, batch_size, True, shuffle, seed, steps_per_epoch)
        train, val = inputs.validation_sources(graph, train, validation_data, validation_split, batch_size, shuffle, seed,
                                               steps_per_epoch)
        session.start(train.first)
        settings = (batch_size, epochs, initial_epoch, steps_per_epoch, shuffle, seed, validation_split, train.steps,
                    inputs.shapes(train.first), val is not None, resume_from is not None, checkpoint_dir is not None)
        session.check_same_everywhere("training settings (batch_size, epochs, data shapes, steps, shuffle, seed, "
                                      "validation, checkpoints)", repr(settings))
        found_epoch, opt_state = checkpoint.resume(model, transport, resume_from, checkpoint_dir if resume else None)
        initial_epoch = max(initial_epoch, found_epoch or 0)
        if opt_state is not None:
            assert session.executor is not None
            compute = session.executor.compute
            checkpoint.restore_optimizer_state(compute.optimizer, model, compute.variables, opt_state)
        verbose = 1 if verbose == "auto" else verbose
        cbs = Callbacks(session, callbacks, int(verbose), epochs, train.steps)
        with distributed(transport):
            with phase("initial weight broadcast"):
                broadcast_variables(transport, model.variables, root=0)
            model.stop_training = False
            cbs.call("on_train_begin")
            for epoch in range(initial_epoch, epochs):
                cbs.call("on_epoch_begin", epoch, label=f" (epoch {epoch})")
                logs = loop.run_epoch(session, train.epoch(epoch), train=True, on_batch=cbs.on_batch(epoch))
                if val is not None:
                    logs.update(loop.run_epoch(session, val.epoch(0), train=False, prefix="val_"))
                loop.sync_replica_state(session)
                _epoch_checkpoint(session, epoch, checkpoint_dir, checkpoint_every, checkpoint_keep, cbs.weights_on_rank0)
                cbs.call("on_epoch_end", epoch, logs, label=f" (epoch {epoch})")
                if loop.agree_to_stop(session):
                    break
            cbs.call("on_train_end")
            with phase("weight gather"):
                gather_stages(session.plan, transport, to_all=gather == "all")
    return cbs.history


def _epoch_checkpoint(session: Session, epoch: int, folder: str | None, every: int, keep: int, gather: bool) -> None:
    """Gather the weights on rank 0 if a callback or a due checkpoint needs them; write it."""
    saving = folder is not None and (epoch + 1) % every == 0
    if gather or saving:
        with phase("weight gather"):
            gather_stages(session.plan, session.transport)
    if saving:
        assert folder is not None
        with phase(f"checkpoint writing (epoch {epoch + 1})"):
            path = os.path.join(folder, checkpoint.CKPT_PATTERN.format(epoch=epoch + 1))
            checkpoint.write_checkpoint(session.model, path, session.transport)
            if session.transport.rank == 0:
                checkpoint.prune(folder, keep)


def evaluate(
    model,
    x=None,
    y=None,
    *,
    batch_size: int = 32,
    num_partitions: int | None = None,
    num_replicas: int | None = None,
    num_microbatches: int | None = None,
    sample_weight=None,
    return_dict: bool = False,
    balance=None,
    comm=None,
):
    """`model.evaluate` across the grid: the loss (and metrics), equal on every rank.
    Weights are taken from rank 0 (where `fit` gathers them)."""
    batch_size = positive_int("batch_size", batch_size, what=" (the global batch)")
    layout = dict(num_partitions=num_partitions, num_replicas=num_replicas, num_microbatches=num_microbatches)
    with _session(model, comm, balance=balance, **layout) as session:
        data = inputs.source(session.plan.graph, x, y, sample_weight, None, batch_size, True)
        session.start(data.first)
        with distributed(session.transport):
            broadcast_variables(session.transport, model.variables, root=0)
            logs = loop.run_epoch(session, data.epoch(0), train=False)
    if return_dict:
        return logs
    values = list(logs.values())
    return values[0] if len(values) == 1 else values


def predict(
    model,
    x,
    *,
    batch_size: int = 32,
    num_partitions: int | None = None,
    num_replicas: int | None = None,
    num_microbatches: int | None = None,
    balance=None,
    comm=None,
):
    """`model.predict` across the grid; every rank returns the full predictions.
    Weights are taken from rank 0 (where `fit` gathers them)."""
    batch_size = positive_int("batch_size", batch_size, what=" (the global batch)")
    layout = dict(num_partitions=num_partitions, num_replicas=num_replicas, num_microbatches=num_microbatches)
    with _session(model, comm, balance=balance, **layout) as session:
        graph, transport = session.plan.graph, session.transport
        data = inputs.source(graph, x, None, None, None, batch_size, False)
        executor = session.start(data.first, need_loss=False)
        specs = [graph.tensors[t] for t in graph.output_tensors]
        chunks: list[list[np.ndarray]] = [[] for _ in specs]
        with distributed(transport):
            broadcast_variables(transport, model.variables, root=0)
            for batch, idx in data.epoch(0):
                micro, norm = session.micro_batches(batch, idx)
                _, _, outs = executor.infer(micro, norm)
                # Each output's owners fill their rows (positions within the batch); a sum
                # over the world assembles the batch.
                local_parts = session.split(np.arange(len(idx)))
                for pos, spec in enumerate(specs):
                    rows = np.zeros((len(idx),) + tuple(spec.shape), np.float64)
                    if pos in session.stage.model_outputs:
                        slot = session.stage.model_outputs.index(pos)
                        for part, preds in zip(local_parts, outs):
                            rows[part] = np.asarray(preds[slot], np.float64)
                    total = np.empty_like(rows)
                    transport.allreduce(rows, total, "prediction assembly")
                    chunks[pos].append(total.astype(np_dtype(spec.dtype) if "float" in spec.dtype else np.float64))
    out = [np.concatenate(c) for c in chunks]
    return out[0] if len(out) == 1 else out
