"""The training loop's pieces that every rank runs together: one pass over the global
batches, logs reduced over the world, one stop decision for all ranks, the
non-trainable state (BatchNorm statistics) averaged across replicas, and the epoch-end
weight gather and checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np

from hyparflow import checkpoint
from hyparflow.checkpoint import gather_stages
from hyparflow.failures import phase
from hyparflow.inputs import Data
from hyparflow.session import Session

OnBatch = Callable[[int, "dict[str, float] | None"], None]


def reduce_logs(
    session: Session, loss_sum: float, parts_sum: np.ndarray, seen: int, prefix: str = ""
) -> dict[str, float]:
    """Loss and metric states summed over the world (one allreduce); equal on every rank."""
    obj = session.objective
    assert obj is not None
    local = np.concatenate([[loss_sum], parts_sum, obj.metric_state(session.stage.model_outputs)])
    total = world_sum(session, local, "log aggregation")
    logs = {f"{prefix}loss": total[0] / max(seen, 1)}
    nout = len(parts_sum)
    if nout > 1:
        for name, v in zip(obj.names, total[1 : 1 + nout]):
            logs[f"{prefix}{name}_loss"] = v / max(seen, 1)
    for k, v in obj.metric_results(total[1 + nout :]).items():
        logs[prefix + k] = v
    return {k: float(v) for k, v in logs.items()}


def world_sum(session: Session, local: np.ndarray, what: str, op: str = "sum") -> np.ndarray:
    """A small float64 vector reduced over the world."""
    total = np.empty_like(local)
    with phase(f"allreduce ({what})"):
        session.transport.allreduce(local, total, what, op=op)
    return total


def agree_to_stop(session: Session) -> bool:
    """Whether any rank's callbacks asked to stop (model.stop_training): one decision for all."""
    model = session.model
    stop = world_sum(session, np.array([float(bool(model.stop_training))]), "stop decision")[0] > 0
    model.stop_training = bool(stop)
    return bool(stop)


def run_epoch(
    session: Session,
    batches: Iterable[tuple[Data, np.ndarray]],
    train: bool,
    on_batch: OnBatch | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """One pass over `batches` (global batches); returns the reduced logs. With `on_batch`,
    logs are reduced and the ranks agree on stopping after every `steps_per_execution`
    steps, where Keras calls batch callbacks."""
    executor, obj = session.executor_or_fail(), session.objective
    assert obj is not None
    per_call = max(int(getattr(session.model, "steps_per_execution", 1) or 1), 1)
    obj.reset_metrics()
    loss_sum, parts_sum, seen = 0.0, np.zeros(len(session.plan.graph.output_names)), 0
    logs: dict[str, float] = {}
    step, pending = -1, False  # pending: a group of steps began whose end was not reported yet
    for step, (data, idx) in enumerate(batches):
        if on_batch is not None and step % per_call == 0:
            on_batch(step, None)
            pending = True
        micro, norm = session.micro_batches(data, idx)
        if train:
            loss, parts = executor.train_step(micro, norm)
        else:
            loss, parts, _ = executor.infer(micro, norm)
        loss_sum += loss * len(idx)
        parts_sum += parts * len(idx)
        seen += len(idx)
        if on_batch is not None and (step + 1) % per_call == 0:
            pending = False
            logs = reduce_logs(session, loss_sum, parts_sum, seen, prefix)
            on_batch(step, logs)
            if train and agree_to_stop(session):
                break
    logs = (
        reduce_logs(session, loss_sum, parts_sum, seen, prefix) if (on_batch is None or pending or not logs) else logs
    )
    if on_batch is not None and pending:
        on_batch(step, logs)
    return logs


def epoch_checkpoint(session: Session, epoch: int, folder: str | None, every: int, keep: int, gather: bool) -> None:
    """Gather the weights on rank 0 if a callback or a due checkpoint needs them; write it."""
    saving = folder is not None and (epoch + 1) % every == 0
    if gather or saving:
        with phase("weight gather"):
            gather_stages(session.plan, session.transport)
    if folder is not None and saving:
        with phase(f"checkpoint writing (epoch {epoch + 1})"):
            path = os.path.join(folder, checkpoint.CKPT_PATTERN.format(epoch=epoch + 1))
            checkpoint.write_checkpoint(session.model, path, session.transport)
            if session.transport.rank == 0:
                checkpoint.prune(folder, keep)


def sync_replica_state(session: Session) -> None:
    """Average non-trainable float state (BatchNorm statistics) across replicas.

    State of a layer called on several stages (tied: `Plan.tied`) is averaged over every
    replica of every stage holding it, so its copies end each epoch identical. Each stage
    moves its copy with its own calls only, so the result is not Keras's (which moves one
    copy call after call) but the mean of the per-stage estimates."""
    trainable = {id(v) for v in session.stage.trainable_variables}
    tied = {id(v): tuple(stages) for v, stages in session.plan.tied}
    groups: dict[str | tuple[int, ...], list] = {}
    for v in session.stage.variables:
        if id(v) not in trainable and "float" in str(v.dtype):
            groups.setdefault(tied.get(id(v), "data"), []).append(v)
    for group in sorted(groups, key=lambda g: (g != "data", g)):  # one order on every rank
        size = session.transport.group_size(group)
        if size > 1:
            _average(session, groups[group], group, size)


def _average(session: Session, variables: list, group: str | tuple[int, ...], size: int) -> None:
    flat = np.concatenate([np.asarray(v.numpy(), np.float64).reshape(-1) for v in variables])
    out = np.empty_like(flat)
    with phase("allreduce (replica state)"):
        session.transport.allreduce(flat, out, "replica state averaging", group=group)
    out /= size
    i = 0
    for v in variables:
        n = int(np.prod(v.shape))
        v.assign(out[i : i + n].reshape(v.shape).astype(str(v.dtype)))
        i += n
