"""The training loop's pieces that every rank runs together: one pass over the global
batches, logs reduced over the world, one stop decision for all ranks, the
non-trainable state (BatchNorm statistics) averaged across replicas, and the epoch-end
weight gather and checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from hyparflow import checkpoint
from hyparflow.checkpoint import gather_stages
from hyparflow.failures import phase
from hyparflow.inputs import Data
from hyparflow.session import Session

OnBatch = Callable[[int, "dict[str, float] | None"], None]


@dataclass
class BatchLogs:
    """Who reads per-step logs in a `run_epoch`, as the ranks agreed (see `callbacks`).

    `lagged`: only progress bars read them, which show the newest values (Keras's `Progbar`
    renders at most every 0.05 s): each step's sums then start reducing without a wait and
    reach the bar as the next step's reduction starts, and no rank waits on a per-step stop
    decision (a bar never stops training). Otherwise every step's logs are reduced before
    its batch-end hooks run, and the ranks agree on stopping after them. `reads`: this rank
    calls the hooks (with `lagged`, only the ranks holding a bar)."""

    call: OnBatch
    lagged: bool = False
    reads: bool = True


def _local_sums(session: Session, loss_sum: float, parts_sum: np.ndarray) -> np.ndarray:
    obj = session.objective
    assert obj is not None
    return np.concatenate([[loss_sum], parts_sum, obj.metric_state(session.stage.model_outputs)])


def _logs(session: Session, total: np.ndarray, nout: int, seen: int, prefix: str) -> dict[str, float]:
    """Keras's logs from world-summed loss, per-output losses and metric states."""
    obj = session.objective
    assert obj is not None
    logs = {f"{prefix}loss": total[0] / max(seen, 1)}
    if nout > 1:
        for name, v in zip(obj.names, total[1 : 1 + nout]):
            logs[f"{prefix}{name}_loss"] = v / max(seen, 1)
    for k, v in obj.metric_results(total[1 + nout :]).items():
        logs[prefix + k] = v
    return {k: float(v) for k, v in logs.items()}


def reduce_logs(
    session: Session, loss_sum: float, parts_sum: np.ndarray, seen: int, prefix: str = ""
) -> dict[str, float]:
    """Loss and metric states summed over the world (one allreduce); equal on every rank."""
    total = world_sum(session, _local_sums(session, loss_sum, parts_sum), "log aggregation")
    return _logs(session, total, len(parts_sum), seen, prefix)


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


class _Lagged:
    """The step sums of `BatchLogs.lagged`, reducing while the next step runs."""

    def __init__(self, session: Session, hook: BatchLogs, nout: int, prefix: str):
        self.session, self.hook, self.nout, self.prefix = session, hook, nout, prefix
        self.inflight: tuple | None = None  # (step, samples seen, send buffer, sum buffer, requests)

    def push(self, step: int, local: np.ndarray, seen: int) -> None:
        """Start reducing step `step`'s sums; hand the previous step's to the bar."""
        self._deliver()
        total = np.empty_like(local)
        self.inflight = (step, seen, local, total, self.session.transport.iallreduce(local, total))

    def _wait(self) -> tuple[int, int, np.ndarray]:
        assert self.inflight is not None
        step, seen, _, total, requests = self.inflight
        self.inflight = None
        with phase("allreduce (log aggregation)"):
            self.session.transport.wait(requests, "log aggregation")
        return step, seen, total

    def _deliver(self) -> None:
        if self.inflight is not None:
            step, seen, total = self._wait()
            if self.hook.reads:
                self.hook.call(step, _logs(self.session, total, self.nout, seen, self.prefix))

    def finish(self, last: int) -> dict[str, float] | None:
        """At the epoch's end: the logs of step `last` if its sums are in flight (they are the
        epoch's), on every rank; else None after handing the bar what is in flight."""
        if self.inflight is None or self.inflight[0] != last:
            self._deliver()
            return None
        step, seen, total = self._wait()
        logs = _logs(self.session, total, self.nout, seen, self.prefix)
        if self.hook.reads:
            self.hook.call(step, logs)
        return logs


def run_epoch(
    session: Session,
    batches: Iterable[tuple[Data, np.ndarray]],
    train: bool,
    on_batch: BatchLogs | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """One pass over `batches` (global batches); returns the reduced logs. With `on_batch`,
    logs are reduced after every `steps_per_execution` steps, where Keras calls batch
    callbacks (see `BatchLogs` for when they wait and when the ranks agree on stopping)."""
    executor, obj = session.executor_or_fail(), session.objective
    assert obj is not None
    per_call = max(int(getattr(session.model, "steps_per_execution", 1) or 1), 1)
    obj.reset_metrics()
    nout = len(session.plan.graph.output_names)
    loss_sum, parts_sum, seen = 0.0, np.zeros(nout), 0
    exact = on_batch is not None and not on_batch.lagged
    lagged = _Lagged(session, on_batch, nout, prefix) if on_batch is not None and on_batch.lagged else None
    logs: dict[str, float] | None = None
    step, pending = -1, False  # pending: a group of steps began whose end was not reported yet
    for step, (data, idx) in enumerate(batches):
        if on_batch is not None and step % per_call == 0:
            if exact:
                on_batch.call(step, None)
            pending = True
        micro, norm = session.micro_batches(data, idx)
        if train:
            loss, parts = executor.train_step(micro, norm)
        else:
            loss, parts, _ = executor.infer(micro, norm)
        loss_sum += loss * len(idx)
        parts_sum += parts * len(idx)
        seen += len(idx)
        if on_batch is None or (step + 1) % per_call:
            continue
        pending = False
        if lagged is not None:
            lagged.push(step, _local_sums(session, loss_sum, parts_sum), seen)
            continue
        assert on_batch is not None
        logs = reduce_logs(session, loss_sum, parts_sum, seen, prefix)
        on_batch.call(step, logs)
        if train and agree_to_stop(session):
            break
    if lagged is not None:
        logs = lagged.finish(step)
    if logs is None or pending:
        logs = reduce_logs(session, loss_sum, parts_sum, seen, prefix)
    if on_batch is not None and pending and on_batch.reads:
        on_batch.call(step, logs)
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
