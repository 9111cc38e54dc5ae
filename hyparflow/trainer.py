"""`hyparflow.fit`, `evaluate` and `predict`: Keras's calls, with Keras's keywords, run
across a grid of `num_replicas x num_partitions` MPI ranks.

Every rank holds the same compiled model and the same data; each reads only its
replica's slice of every global batch and only the inputs and targets its stage needs.
A repeated call with the same model, layout and compilation reuses its session.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from hyparflow import checkpoint, inputs, keras_compat, loop, memory, rebalance
from hyparflow import timeline as timelines
from hyparflow.callbacks import Callbacks, release_hint
from hyparflow.checkpoint import gather_stages
from hyparflow.errors import ConfigError
from hyparflow.failures import distributed, phase
from hyparflow.feed import Feed
from hyparflow.graph import np_dtype
from hyparflow.replicas import PerReplica
from hyparflow.session import Session, open_session
from hyparflow.settings import positive_int, switch

Balance = str | Sequence[int] | Sequence[str] | None
_STEPS = {
    "fit": ("train_step", "compute_loss", "compute_metrics"),
    "evaluate": ("test_step", "compute_loss", "compute_metrics"),
    "predict": ("predict_step",),
}


def _check_model(model, call: str) -> None:
    """Refuse a model whose class replaces a step hyparflow runs split across stages."""
    custom = keras_compat.overridden_steps(model, _STEPS[call])
    if custom:
        raise ConfigError(
            f"Model '{model.name}' ({type(model).__name__}) overrides {', '.join(custom)}; hyparflow.{call} runs "
            "Keras's "
            "standard step split across stages and pipeline micro-batches, so it cannot run a custom one. Express the "
            "objective with compile(loss=..., loss_weights=..., metrics=...) and add_loss in layers, or use "
            f"model.{call}."
        )


def _layout(
    num_partitions, num_replicas, num_microbatches, schedule=None, placement="pipeline", virtual_stages=None
) -> dict[str, Any]:
    return dict(
        num_partitions=num_partitions,
        num_replicas=num_replicas,
        num_microbatches=num_microbatches,
        schedule=schedule,
        placement=placement,
        virtual_stages=virtual_stages,
    )


def _steps(name: str, value: int | None) -> int | None:
    return None if value is None else positive_int(name, value)


def _verbose(verbose: str | int, rank: int) -> int:
    return 0 if rank else (1 if verbose == "auto" else int(verbose))


def _should_validate(epoch: int, freq: int | Sequence[int]) -> bool:
    """Keras's rule: every `freq` epochs, or at the (1-based) epochs listed."""
    if isinstance(freq, int) and not isinstance(freq, bool):
        return (epoch + 1) % positive_int("validation_freq", freq) == 0
    if isinstance(freq, (list, tuple)):
        return epoch + 1 in freq
    raise ConfigError(f"validation_freq must be an int or a list of epochs, got {freq!r}.")


def fit(
    model,
    x=None,
    y=None,
    batch_size: int | None = None,
    epochs: int = 1,
    verbose: str | int = "auto",
    callbacks: Sequence[Any] | None = None,
    validation_split: float = 0.0,
    validation_data=None,
    shuffle: bool = True,
    class_weight: dict | None = None,
    sample_weight=None,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    validation_batch_size: int | None = None,
    validation_freq: int | Sequence[int] = 1,
    *,
    num_partitions: int | None = None,
    num_replicas: int | None = None,
    num_microbatches: int | None = None,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    recompute: bool | None = None,
    balance: Balance = None,
    memory_limit: float | None = None,
    placement_policy: str = "pipeline",
    seed: int = 0,
    gather: str = "rank0",
    resume_from: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    checkpoint_keep: int = 3,
    resume: bool = True,
    timeline: str | None = None,
    comm=None,
) -> keras.callbacks.History:
    """Train `model` like `model.fit` (same keywords, same meaning), split into
    `num_partitions` pipeline stages and `num_replicas` data-parallel replicas (default:
    world size / num_partitions). Layout settings left as None come from
    HYPARFLOW_PARTITIONS / _REPLICAS / _MICROBATCHES / _SCHEDULE / _VIRTUAL_STAGES (what
    `hyparflow run` passes), else 1 partition, 1 micro-batch, 1F1B.

    `schedule="interleaved"` cuts the model into `num_partitions x virtual_stages` stages
    (default 2 a rank) and gives rank p stages p, p + P, ...: the pipeline's bubble shrinks
    by that factor, for as many more activation transfers (Megatron-LM's interleaved 1F1B).

    `recompute=True` (or HYPARFLOW_RECOMPUTE=1) keeps only each stage's inputs between a
    micro-batch's forward and its backward, which runs the forward again: activation
    memory of the stages that wait for gradients drops to their boundary tensors, at the
    cost of a second forward; results are unchanged (dropout masks and BatchNorm statistics
    included).

    A new session's "time" plan is timed in the pipeline before the first update, and its
    cuts move where the stages' own times say it pays (`hyparflow.rebalance`).

    `batch_size` is the global batch. Each replica's share is cut into
    `num_microbatches` micro-batches; batches that do not divide evenly are split as
    evenly as possible and weighted exactly. Array data is shuffled with `seed`, alike on
    every rank. While training, each rank holds only its stage's variables (see
    `hyparflow.memory`). On return, rank 0's model holds all trained weights
    (`gather="all"`: every rank's does; `gather="none"`: none does, each rank keeps its
    stage, and `hyparflow.save` writes the whole model from the stages).

    Checkpoints: `resume_from` loads a `.keras` file (weights and optimizer state, any
    layout) before training. `checkpoint_dir` writes `epoch-NNNNN.keras` every
    `checkpoint_every` epochs, keeps the newest `checkpoint_keep`, and (with `resume`)
    starts from the newest checkpoint rank 0 can read, continuing at its epoch.
    `timeline` (default: HYPARFLOW_TIMELINE): a Chrome-trace JSON file that rank 0 writes
    with every rank's steps, forwards, backwards, waits, sends, allreduces, optimizer steps,
    data loading and callbacks on one clock (see `hyparflow.timeline`); draw it with
    `hyparflow timeline FILE --png schedule.png`.
    `comm`: an mpi4py communicator, or a `hyparflow.loopback` one (default: the world).
    """
    _check_model(model, "fit")
    trace_path = timelines.path_from(timeline)
    if batch_size is not None:
        batch_size = positive_int("batch_size", batch_size, what=" (the global batch)")
    epochs = positive_int("epochs", epochs, minimum=0)
    if gather not in ("rank0", "all", "none"):
        raise ConfigError(f"gather={gather!r}: expected 'rank0', 'all' or 'none'.")
    steps_per_epoch, validation_steps = (
        _steps("steps_per_epoch", steps_per_epoch),
        _steps("validation_steps", validation_steps),
    )
    layout = _layout(num_partitions, num_replicas, num_microbatches, schedule, placement_policy, virtual_stages)
    recompute = switch("recompute", recompute)
    session = open_session(model, comm, layout, balance, memory_limit, announce=True, batch_size=batch_size)
    graph, transport = session.plan.graph, session.transport
    feed = Feed.of(session, with_targets=True)
    train = inputs.source(
        graph, x, y, sample_weight, class_weight, batch_size, True, shuffle, seed, steps_per_epoch, feed=feed
    )
    train, val = inputs.validation_sources(
        graph,
        train,
        validation_data,
        validation_split,
        validation_batch_size or batch_size,
        shuffle,
        seed,
        steps_per_epoch,
        validation_steps,
        feed,
    )
    hint = release_hint(session, callbacks, memory.HINTS[gather], always=gather == "none")
    session.start(train.first, release=hint)
    session.compute.recompute = recompute
    settings = (
        batch_size,
        epochs,
        initial_epoch,
        steps_per_epoch,
        shuffle,
        seed,
        validation_split,
        train.steps,
        train.signature,
        val is not None,
        resume_from is not None,
        checkpoint_dir is not None,
        trace_path is not None,
    )
    session.check_same_everywhere(
        "training settings (batch_size, epochs, data shapes, steps, shuffle, seed, validation, checkpoints, timeline)",
        repr(settings),
    )
    found_epoch, opt_state = checkpoint.resume(model, transport, resume_from, checkpoint_dir if resume else None)
    initial_epoch = max(initial_epoch, found_epoch or 0)
    if opt_state is not None:
        compute = session.compute
        checkpoint.restore_optimizer_state(compute.optimizer, model, compute.variables, opt_state)
    with distributed(transport):
        with phase("initial weight broadcast"):
            checkpoint.scatter_stages(session.plan, transport, hint, release_root=True)
        if rebalance.eligible(session, train, epochs - initial_epoch):
            with phase("rebalance"):
                rebalance.rebalance(session, train, initial_epoch, train.steps * (epochs - initial_epoch), hint)
        recorder = timelines.Timeline.start(session, trace_path) if trace_path is not None else None
    cbs = Callbacks(session, callbacks, _verbose(verbose, transport.rank), "train", epochs, train.steps)
    with distributed(transport):
        model.stop_training = False
        cbs.call("on_train_begin")
        logs: dict[str, float] | None = None
        for epoch in range(initial_epoch, epochs):
            cbs.call("on_epoch_begin", epoch, label=f" (epoch {epoch})")
            batches = timelines.timed_batches(recorder, train.epoch(epoch))
            logs = loop.run_epoch(session, batches, train=True, on_batch=cbs.on_batch("train", epoch))
            if val is not None and _should_validate(epoch, validation_freq):
                cbs.call("on_test_begin")
                batches = timelines.timed_batches(recorder, val.epoch(0))
                val_logs = loop.run_epoch(session, batches, train=False, on_batch=cbs.on_batch("test", epoch))
                cbs.call("on_test_end", val_logs)
                logs.update({f"val_{k}": v for k, v in val_logs.items()})
            loop.sync_replica_state(session)
            loop.epoch_checkpoint(
                session, epoch, checkpoint_dir, checkpoint_every, checkpoint_keep, cbs.weights_on_rank0
            )
            cbs.call("on_epoch_end", epoch, logs, label=f" (epoch {epoch})")
            if loop.agree_to_stop(session):
                break
        cbs.call("on_train_end", logs)
        if gather != "none":
            with phase("weight gather"):
                gather_stages(session.plan, transport, to_all=gather == "all")
        session.spread = gather == "none"
        if recorder is not None:
            recorder.finish()
    return cbs.history


def evaluate(
    model,
    x=None,
    y=None,
    batch_size: int | None = None,
    verbose: str | int = "auto",
    sample_weight=None,
    steps: int | None = None,
    callbacks: Sequence[Any] | None = None,
    return_dict: bool = False,
    *,
    num_partitions: int | None = None,
    num_replicas: int | None = None,
    num_microbatches: int | None = None,
    balance: Balance = None,
    comm=None,
):
    """`model.evaluate` across the grid (same keywords): the loss and metrics, equal on
    every rank. Weights are taken from rank 0 (where `fit` gathers them)."""
    _check_model(model, "evaluate")
    if batch_size is not None:
        batch_size = positive_int("batch_size", batch_size, what=" (the global batch)")
    layout = _layout(num_partitions, num_replicas, num_microbatches)
    session = open_session(model, comm, layout, balance, batch_size=batch_size)
    feed = Feed.of(session, with_targets=True)
    data = inputs.source(
        session.plan.graph, x, y, sample_weight, None, batch_size, True, steps=_steps("steps", steps), feed=feed
    )
    session.start(data.first)
    cbs = Callbacks(session, callbacks, _verbose(verbose, session.transport.rank), "test", 1, data.steps)
    hint = release_hint(session, callbacks, memory.HINTS["rank0"])
    with distributed(session.transport):
        checkpoint.scatter_stages(session.plan, session.transport, hint, release_root=False)
        cbs.call("on_test_begin")
        logs = loop.run_epoch(session, data.epoch(0), train=False, on_batch=cbs.on_batch("test", 0))
        cbs.call("on_test_end", logs)
    if return_dict:
        return logs
    values = list(logs.values())
    return values[0] if len(values) == 1 else values


def predict(
    model,
    x,
    batch_size: int | None = None,
    verbose: str | int = "auto",
    steps: int | None = None,
    callbacks: Sequence[Any] | None = None,
    *,
    num_partitions: int | None = None,
    num_replicas: int | None = None,
    num_microbatches: int | None = None,
    balance: Balance = None,
    comm=None,
):
    """`model.predict` across the grid (same keywords); every rank returns the full
    predictions. Weights are taken from rank 0 (where `fit` gathers them)."""
    _check_model(model, "predict")
    if isinstance(x, PerReplica):
        raise ConfigError(
            "hyparflow.predict does not take PerReplica input: the order of its predictions would depend on how "
            "the replicas split the data. Pass one dataset (every replica reads its share of each batch)."
        )
    if batch_size is not None:
        batch_size = positive_int("batch_size", batch_size, what=" (the global batch)")
    layout = _layout(num_partitions, num_replicas, num_microbatches)
    session = open_session(model, comm, layout, balance, batch_size=batch_size)
    feed = Feed.of(session, with_targets=False)
    data = inputs.source(
        session.plan.graph, x, None, None, None, batch_size, False, steps=_steps("steps", steps), feed=feed
    )
    session.start(data.first, need_loss=False)
    cbs = Callbacks(session, callbacks, _verbose(verbose, session.transport.rank), "predict", 1, data.steps)
    chunks: list[list[np.ndarray]] = [[] for _ in session.plan.graph.output_tensors]
    hint = release_hint(session, callbacks, memory.HINTS["rank0"])
    with distributed(session.transport):
        checkpoint.scatter_stages(session.plan, session.transport, hint, release_root=False)
        cbs.call("on_predict_begin")
        for step, (batch, idx) in enumerate(data.epoch(0)):
            cbs.call("on_predict_batch_begin", step)
            outputs = _predict_batch(session, batch, idx)
            for pos, out in enumerate(outputs):
                chunks[pos].append(out)
            cbs.call("on_predict_batch_end", step, {"outputs": outputs[0] if len(outputs) == 1 else outputs})
        cbs.call("on_predict_end")
    arrays = [np.concatenate(c) for c in chunks]
    return arrays[0] if len(arrays) == 1 else arrays


def _predict_batch(session: Session, batch: inputs.Data, idx: np.ndarray) -> list[np.ndarray]:
    """One global batch's outputs on every rank: each output's owners fill their rows, and a
    sum over the world assembles the batch."""
    graph = session.plan.graph
    micro, _ = session.micro_batches(batch, idx)
    _, _, outs = session.executor_or_fail().infer(micro, None)
    local_parts = session.split(np.arange(len(idx)))
    result = []
    for pos, t in enumerate(graph.output_tensors):
        spec = graph.tensors[t]
        rows = np.zeros((len(idx),) + tuple(spec.shape), np.float64)
        if pos in session.stage.model_outputs:
            slot = session.stage.model_outputs.index(pos)
            for part, preds in zip(local_parts, outs):
                rows[part] = np.asarray(preds[slot], np.float64)
        total = np.empty_like(rows)
        session.transport.allreduce(rows, total, "prediction assembly")
        result.append(total.astype(np_dtype(spec.dtype) if "float" in spec.dtype else np.float64))
    return result
