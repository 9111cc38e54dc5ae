"""`hyparflow.fit`, `evaluate` and `predict`: Keras's calls, run across a grid of
`num_replicas x num_partitions` MPI ranks.

Every rank holds the same compiled model and the same data; each reads only its
replica's slice of every global batch and only the inputs and targets its stage needs.
Batches are cut identically on every rank from a seeded permutation, so no rank ever
waits for a step another rank does not run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from mpi4py import MPI

from hyparflow import checkpoint, keras_compat, placement
from hyparflow.checkpoint import broadcast_variables, gather_stages
from hyparflow.comm import Grid, make_grid
from hyparflow.errors import ConfigError
from hyparflow.failures import distributed, install_excepthook, phase, state
from hyparflow.graph import ModelGraph, np_dtype
from hyparflow.objective import Objective
from hyparflow.partition import Plan
from hyparflow.partition import plan as make_plan
from hyparflow.pipeline import SCHEDULES, MicroBatch, StageRunner, StepNorm

log = logging.getLogger("hyparflow")

# Callbacks that write files or print: only rank 0 runs them.
RANK0_CALLBACKS = (keras.callbacks.ModelCheckpoint, keras.callbacks.CSVLogger, keras.callbacks.TensorBoard, keras.callbacks.ProgbarLogger)


# ---- data ------------------------------------------------------------------------
def _as_list(data, names: list[str], what: str, allow_none: bool = False) -> list[np.ndarray | None]:
    """Normalise x / y / sample_weight (array, list or dict by name) to one entry per name."""
    if data is None:
        if allow_none:
            return [None] * len(names)
        raise ConfigError(f"{what} is missing.")
    if isinstance(data, dict):
        unknown = set(data) - set(names)
        if unknown:
            raise ConfigError(f"{what} has keys {sorted(unknown)} that match none of the model's names {names}.")
        missing = [n for n in names if n not in data]
        if missing and not allow_none:
            raise ConfigError(f"{what} lacks entries for {missing}.")
        items = [data.get(n) for n in names]
    elif isinstance(data, (list, tuple)):
        if len(data) != len(names):
            raise ConfigError(f"{what} has {len(data)} arrays but the model has {len(names)} ({names}).")
        items = list(data)
    else:
        items = [data] * len(names) if what == "sample_weight" else [data] if len(names) == 1 else None
        if items is None:
            raise ConfigError(f"{what} is a single array but the model has {len(names)} of them ({names}); pass a list or a dict.")
    return [None if a is None else np.asarray(a) for a in items]


@dataclass
class Data:
    """Arrays aligned to the model's inputs and outputs."""

    x: list[np.ndarray]
    y: list[np.ndarray | None]
    sw: list[np.ndarray | None]  # None: no sample weights for that output (as Keras's None)

    def __len__(self) -> int:
        return len(self.x[0])

    def take(self, idx: np.ndarray) -> Data:
        rows = lambda arrays: [None if a is None else a[idx] for a in arrays]  # noqa: E731
        return Data(rows(self.x), rows(self.y), rows(self.sw))


def _prepare(graph: ModelGraph, x, y, sample_weight, class_weight, with_targets: bool) -> Data:
    xs = _as_list(x, graph.input_names, "x")
    ys = _as_list(y, graph.output_names, "y", allow_none=not with_targets) if with_targets or y is not None else [None] * len(graph.output_names)
    sws = _as_list(sample_weight, graph.output_names, "sample_weight", allow_none=True)
    n = len(xs[0])
    if n == 0:
        raise ConfigError("x is empty: there is nothing to train on.")
    for name, a, t in zip(graph.input_names, xs, graph.functional.inputs):
        _check_shape(f"input '{name}'", a, t.shape, n)
        if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
            raise ConfigError(f"input '{name}' has dtype {a.dtype}; hyparflow feeds numeric arrays.")
    for name, a in zip(graph.output_names, ys):
        if a is not None and len(a) != n:
            raise ConfigError(f"y for output '{name}' has {len(a)} samples but x has {n}.")
    for name, a in zip(graph.output_names, sws):
        if a is not None and (a.ndim < 1 or len(a) != n):
            raise ConfigError(f"sample_weight for output '{name}' has shape {a.shape}; expected ({n}, ...): one row per sample.")
    if class_weight is not None:
        if len(graph.output_names) != 1:
            raise ConfigError("class_weight works for single-output models only (as in Keras); use sample_weight per output.")
        labels = ys[0].reshape(n, -1)
        labels = labels.argmax(axis=1) if labels.shape[1] > 1 else labels[:, 0].round().astype(int)
        missing = sorted(set(np.unique(labels).tolist()) - set(class_weight))
        if missing:
            raise ConfigError(f"class_weight has no weight for classes {missing}.")
        cw = np.array([class_weight[int(c)] for c in labels], np.float32)
        sws = [cw if s is None else s * cw for s in sws]
    sws = [None if s is None else s.astype(np.float32) for s in sws]
    return Data(xs, ys, sws)


def _check_shape(what: str, array: np.ndarray, spec, n: int) -> None:
    expected = tuple(spec[1:])
    got = array.shape[1:]
    if len(array) != n:
        raise ConfigError(f"{what} has {len(array)} samples, other inputs have {n}.")
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        raise ConfigError(f"{what} has per-sample shape {got} but the model expects {expected}.")


class ArraySource:
    """Global batches from in-memory arrays, cut identically on every rank."""

    def __init__(self, data: Data, batch_size: int, shuffle: bool = False, seed: int = 0, steps_per_epoch: int | None = None):
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.seed = np.random.SeedSequence(seed)
        self.cycle = steps_per_epoch is not None  # epochs continue where the last stopped
        self.steps = steps_per_epoch if self.cycle else -(-len(data) // batch_size)
        self.first = data

    def _pass(self, p: int) -> np.ndarray:
        n = len(self.data)
        return np.random.default_rng([self.seed.entropy, p]).permutation(n) if self.shuffle else np.arange(n)

    def epoch(self, epoch: int) -> Iterator[tuple[Data, np.ndarray]]:
        n, want = len(self.data), self.steps * self.batch_size
        if self.cycle:
            start = epoch * want
            first, last = start // n, (start + want - 1) // n
            order = np.concatenate([self._pass(p) for p in range(first, last + 1)])[start - first * n :][:want]
        else:
            order = self._pass(epoch)
        for step in range(self.steps):
            yield self.data, order[step * self.batch_size : (step + 1) * self.batch_size]


class DatasetSource:
    """Global batches from a batched `tf.data.Dataset`.

    Every rank iterates its own copy of the pipeline, which must yield the same batches
    on every rank (seed any shuffle); each replica then takes its share of every batch,
    so every rank runs the same number of steps and every sample counts once.
    """

    def __init__(self, dataset, graph: ModelGraph, with_targets: bool, steps_per_epoch: int | None = None):
        self.dataset, self.graph, self.with_targets = dataset, graph, with_targets
        first = next(iter(dataset.take(1)), None)
        if first is None:
            raise ConfigError("The dataset is empty: there is nothing to train on.")
        self.first = self._convert(first)
        cardinality = int(dataset.cardinality())
        self.steps = steps_per_epoch if steps_per_epoch is not None else (cardinality if cardinality >= 0 else None)

    def _convert(self, element) -> Data:
        import keras

        if isinstance(element, tuple) and self.with_targets:
            if len(element) not in (2, 3):
                raise ConfigError(f"dataset elements must be (x, y) or (x, y, sample_weight), got a tuple of {len(element)}.")
            x, y, *sw = element
        else:
            x, y, sw = (element[0] if isinstance(element, tuple) else element), None, []
        to_np = lambda t: keras.tree.map_structure(lambda a: np.asarray(a), t)  # noqa: E731
        return _prepare(self.graph, to_np(x), to_np(y), to_np(sw[0]) if sw else None, None, with_targets=self.with_targets)

    def epoch(self, epoch: int) -> Iterator[tuple[Data, np.ndarray]]:
        for step, element in enumerate(self.dataset):
            if self.steps is not None and step >= self.steps:
                break
            data = self._convert(element)
            yield data, np.arange(len(data))


def source(graph: ModelGraph, x, y, sample_weight, class_weight, batch_size: int, with_targets: bool, shuffle=False, seed=0, steps_per_epoch=None):
    """An ArraySource or DatasetSource for what the user passed as x."""
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None or class_weight is not None:
            raise ConfigError("With a tf.data.Dataset, targets and sample weights come from the dataset: do not pass y, sample_weight or class_weight.")
        return DatasetSource(x, graph, with_targets, steps_per_epoch)
    data = _prepare(graph, x, y, sample_weight, class_weight, with_targets)
    return ArraySource(data, batch_size, shuffle, seed, steps_per_epoch)


# ---- the distributed session -------------------------------------------------------
def _env_default(value, var: str, default, kind=int):
    if value is not None:
        return value
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a valid {kind.__name__}.") from None


class Session:
    """A model planned and placed on the job's ranks, ready to run steps."""

    def __init__(
        self, model, num_partitions, num_replicas, num_microbatches, schedule, balance, memory_limit, placement_policy: str, comm=None, announce=False
    ):
        self.world = comm if comm is not None else MPI.COMM_WORLD
        state.where = ""
        num_partitions = _env_default(num_partitions, "HYPARFLOW_PARTITIONS", 1)
        num_replicas = _env_default(num_replicas, "HYPARFLOW_REPLICAS", None)
        num_microbatches = _env_default(num_microbatches, "HYPARFLOW_MICROBATCHES", 1)
        schedule = _env_default(schedule, "HYPARFLOW_SCHEDULE", "1f1b", str)
        install_excepthook()
        size = self.world.Get_size()
        if not isinstance(num_partitions, int) or num_partitions < 1:
            raise ConfigError(f"num_partitions must be a positive integer, got {num_partitions!r}.")
        if num_replicas is None:
            if size % num_partitions:
                raise ConfigError(f"The job has {size} ranks, not a multiple of num_partitions={num_partitions}; launch with -np k*{num_partitions}.")
            num_replicas = size // num_partitions
        if not isinstance(num_microbatches, int) or num_microbatches < 1:
            raise ConfigError(f"num_microbatches must be a positive integer, got {num_microbatches!r}.")
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule={schedule!r}: expected one of {SCHEDULES}.")
        placement.check_grid(size, num_partitions, num_replicas, placement_policy)
        self.model = model
        self.P, self.R, self.M = num_partitions, num_replicas, num_microbatches
        with phase("plan"):
            graph = ModelGraph(model)
            self.check_same_everywhere("model", graph.fingerprint, "every rank must build the same model (same layers, connections and weight shapes).")
            # Rank 0 plans (a "time" balance measures, which differs between ranks); all follow.
            starts = None
            if self.world.Get_rank() == 0:
                try:
                    starts = make_plan(model, num_partitions, balance, memory_limit).starts
                except ConfigError as e:
                    starts = e
            starts = self.world.bcast(starts, root=0)
            if isinstance(starts, ConfigError):
                raise ConfigError(str(starts))
            self.plan = Plan(graph, starts, balance if isinstance(balance, str) else "explicit")
            self.check_same_everywhere("plan", self.plan.fingerprint)
        with phase("placement"):
            slots = placement.discover(self.world)
            assignment = placement.assign(slots, num_partitions, num_replicas, placement_policy)
            self.grid: Grid = make_grid(self.world, assignment, num_partitions, num_replicas)
            state.where = self.grid.where()
            if announce and self.world.Get_rank() == 0:
                log.info("rank map (P=%d x R=%d, M=%d, %s):\n%s", self.P, self.R, self.M, schedule, placement.describe(slots, assignment))
        self.schedule = schedule
        self.stage = self.plan.stages[self.grid.stage]
        self.runner: StageRunner | None = None
        self.objective: Objective | None = None

    def check_same_everywhere(self, what: str, value: str, hint: str = "every rank must call hyparflow with the same model, data and settings.") -> None:
        """Raise the same ConfigError on every rank unless all ranks pass the same value."""
        values = self.world.allgather(value)
        if len(set(values)) > 1:
            odd = [r for r, v in enumerate(values) if v != values[0]]
            raise ConfigError(f"The {what} differs between ranks (ranks {odd} differ from rank 0): {hint}")

    def start(self, data: Data, need_loss: bool = True) -> StageRunner:
        """Resolve the compiled loss and metrics against a sample batch and build the stage runner."""
        if self.runner is None:
            specs = [self.plan.graph.tensors[t].ref for t in self.plan.graph.output_tensors]
            y_sample = [None if y is None else y[:2] for y in data.y]
            self.objective = Objective(self.model, self.plan.graph.output_names, y_sample, specs, need_loss)
            self.runner = StageRunner(
                self.plan, self.grid, self.objective, getattr(self.model, "optimizer", None), self.schedule
            )  # none: predict on an uncompiled model
        return self.runner

    # ---- batches -------------------------------------------------------------
    def split(self, idx: np.ndarray) -> list[np.ndarray]:
        """This rank's micro-batches of a global batch: its replica's share, cut in up to M."""
        return self._cut(np.array_split(idx, self.R)[self.grid.replica])

    def _cut(self, share: np.ndarray) -> list[np.ndarray]:
        return np.array_split(share, min(self.M, len(share))) if len(share) else []

    def micro_batches(self, data: Data, idx: np.ndarray) -> tuple[list[MicroBatch], StepNorm]:
        """This rank's micro-batches of global batch `idx`, and the step's normalisers."""
        shares = np.array_split(idx, self.R)
        parts = self._cut(shares[self.grid.replica])
        st = self.stage
        micro = [
            MicroBatch(
                size=len(p),
                inputs=[data.x[i][p] for i in st.data_inputs],
                targets=[np.zeros(len(p), np.float32) if data.y[o] is None else data.y[o][p] for o in st.model_outputs],
                weights=[None if data.sw[o] is None else data.sw[o][p] for o in st.model_outputs],
            )
            for p in parts
        ]
        divisors = self.objective.divisors(data.x, data.y, data.sw, idx)
        total_micro = sum(min(self.M, len(s)) for s in shares)
        return micro, StepNorm(divisors, 1.0 / max(total_micro, 1), len(idx))

    # ---- logs ----------------------------------------------------------------
    def logs(self, loss_sum: float, parts_sum: np.ndarray, seen: int, prefix: str = "") -> dict[str, float]:
        """Aggregate loss and metric states over the world (one Allreduce); equal on every rank."""
        obj = self.objective
        local = np.concatenate([[loss_sum], parts_sum, obj.metric_state(self.stage.model_outputs)])
        total = self.allreduce(local, "log aggregation")
        logs = {f"{prefix}loss": total[0] / max(seen, 1)}
        nout = len(parts_sum)
        if nout > 1:
            for name, v in zip(obj.names, total[1 : 1 + nout]):
                logs[f"{prefix}{name}_loss"] = v / max(seen, 1)
        for k, v in obj.metric_results(total[1 + nout :]).items():
            logs[prefix + k] = v
        return {k: float(v) for k, v in logs.items()}

    def allreduce(self, local: np.ndarray, what: str) -> np.ndarray:
        """Sum a small float64 vector over the world, with the stall watchdog."""
        total = np.empty_like(local)
        with phase(f"allreduce ({what})"):
            self.runner.net.allreduce_sum(self.world, local, total, what)
        return total

    def agree_to_stop(self) -> bool:
        """Whether any rank's callbacks asked to stop (model.stop_training): one decision for all."""
        stop = self.allreduce(np.array([float(bool(self.model.stop_training))]), "stop decision")[0] > 0
        self.model.stop_training = bool(stop)
        return bool(stop)

    def run_epoch(self, batches: Iterable[tuple[Data, np.ndarray]], train: bool, on_batch=None, prefix: str = "") -> dict[str, float]:
        """One pass over `batches` (global batches); returns the aggregated logs."""
        self.objective.reset_metrics()
        loss_sum, parts_sum, seen = 0.0, np.zeros(len(self.plan.graph.output_names)), 0
        logs: dict[str, float] = {}
        for step, (data, idx) in enumerate(batches):
            if on_batch is not None:
                on_batch(step, None)
            micro, norm = self.micro_batches(data, idx)
            if train:
                loss, parts = self.runner.train_step(micro, norm)
            else:
                loss, parts, _ = self.runner.infer(micro, norm)
            loss_sum += loss * len(idx)
            parts_sum += parts * len(idx)
            seen += len(idx)
            if on_batch is not None:
                logs = self.logs(loss_sum, parts_sum, seen, prefix)
                on_batch(step, logs)
                if self.agree_to_stop():
                    break
        if on_batch is None or not logs:
            logs = self.logs(loss_sum, parts_sum, seen, prefix)
        return logs

    def sync_state(self) -> None:
        """Average non-trainable float state (BatchNorm statistics) across replicas."""
        trainable = {id(v) for v in self.stage.trainable_variables}
        state_vars = [v for v in self.stage.variables if id(v) not in trainable and "float" in str(v.dtype)]
        if self.R == 1 or not state_vars:
            return
        flat = np.concatenate([np.asarray(v.numpy(), np.float64).reshape(-1) for v in state_vars])
        out = np.empty_like(flat)
        self.grid.data.Allreduce(flat, out, op=MPI.SUM)
        out /= self.R
        i = 0
        for v in state_vars:
            n = int(np.prod(v.shape))
            v.assign(out[i : i + n].reshape(v.shape).astype(str(v.dtype)))
            i += n


def _shapes(data: Data) -> list:
    """Per-array shapes and dtypes of the training data (compared across ranks)."""
    return [None if a is None else (a.shape, str(a.dtype)) for a in data.x + data.y]


def _has_batch_hooks(callback) -> bool:
    """Whether a Keras callback overrides a training-batch hook (Keras marks its defaults)."""
    hooks = ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")
    return any(not keras_compat.is_default(getattr(callback, h)) for h in hooks)


def _check_batch(batch_size) -> int:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer (the global batch), got {batch_size!r}.")
    return int(batch_size)


# ---- public calls --------------------------------------------------------------------
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
    starts from the newest readable one, continuing at its epoch.
    """
    batch_size = _check_batch(batch_size)
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}.")
    if gather not in ("rank0", "all"):
        raise ConfigError(f"gather={gather!r}: expected 'rank0' or 'all'.")
    if not 0.0 <= validation_split < 1.0:
        raise ConfigError(f"validation_split must be in [0, 1), got {validation_split}.")
    session = Session(model, num_partitions, num_replicas, num_microbatches, schedule, balance, memory_limit, placement_policy, comm, announce=True)
    graph = session.plan.graph
    if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
        raise ConfigError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}.")
    train = source(graph, x, y, sample_weight, class_weight, batch_size, True, shuffle, seed, steps_per_epoch)
    val = None
    if validation_split:
        if not isinstance(train, ArraySource):
            raise ConfigError("validation_split needs arrays; with a tf.data.Dataset pass validation_data.")
        data = train.data
        cut = int(len(data) * (1.0 - validation_split))
        if cut == 0 or cut == len(data):
            raise ConfigError(f"validation_split={validation_split} leaves no training or no validation samples out of {len(data)}.")
        train = ArraySource(data.take(np.arange(cut)), batch_size, shuffle, seed, steps_per_epoch)
        val = ArraySource(data.take(np.arange(cut, len(data))), batch_size)
    elif validation_data is not None:
        import tensorflow as tf

        if isinstance(validation_data, tf.data.Dataset):
            val = DatasetSource(validation_data, graph, True)
        elif isinstance(validation_data, (tuple, list)) and len(validation_data) in (2, 3):
            vx, vy, *vsw = validation_data
            val = source(graph, vx, vy, vsw[0] if vsw else None, None, batch_size, True)
        else:
            raise ConfigError("validation_data must be (x, y), (x, y, sample_weight) or a tf.data.Dataset.")
    session.start(train.first)
    settings = (batch_size, epochs, initial_epoch, steps_per_epoch, shuffle, seed, validation_split, train.steps, _shapes(train.first), val is not None)
    session.check_same_everywhere("training settings (batch_size, epochs, data shapes, steps, shuffle, seed, validation)", repr(settings))
    opt_state = None
    if resume_from is not None:
        opt_state = checkpoint.load(model, resume_from)
    elif checkpoint_dir and resume:
        found = checkpoint.latest(model, checkpoint_dir)
        if found is not None:
            initial_epoch, opt_state = max(initial_epoch, found[0]), found[1]
    if opt_state is not None:
        checkpoint.restore_optimizer_state(session.runner.optimizer, model, session.stage.trainable_variables, opt_state)
    world_rank = session.world.Get_rank()
    if verbose == "auto":
        verbose = 1
    cbs = [cb for cb in (callbacks or []) if world_rank == 0 or not isinstance(cb, RANK0_CALLBACKS)]
    callback_list = keras.callbacks.CallbackList(
        cbs, add_history=True, add_progbar=bool(verbose) and world_rank == 0, model=model, verbose=verbose, epochs=epochs, steps=train.steps
    )
    history = next(cb for cb in callback_list.callbacks if isinstance(cb, keras.callbacks.History))
    # Decided together, since rank-0-only callbacks differ: does any rank need the weights
    # on rank 0 at epoch ends, and does any rank have batch-level callbacks (per-step logs)?
    flags = np.array([any(isinstance(cb, keras.callbacks.ModelCheckpoint) for cb in cbs), any(map(_has_batch_hooks, callback_list.callbacks))], float)
    agreed = np.empty_like(flags)
    session.world.Allreduce(flags, agreed, op=MPI.MAX)
    needs_weights_on_rank0, batch_hooks = (bool(f) for f in agreed)

    with distributed():
        with phase("initial weight broadcast"):
            broadcast_variables(session.world, model.variables, root=0)
        model.stop_training = False
        with phase("callback on_train_begin"):
            callback_list.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            with phase(f"callback on_epoch_begin (epoch {epoch})"):
                callback_list.on_epoch_begin(epoch)

            def on_batch(step, logs, epoch=epoch):
                """Batch callbacks: logs=None before the step, the aggregated logs after it."""
                with phase(f"callback on_train_batch_{'begin' if logs is None else 'end'} (epoch {epoch}, step {step})"):
                    if logs is None:
                        callback_list.on_train_batch_begin(step)
                    else:
                        callback_list.on_train_batch_end(step, logs)

            logs = session.run_epoch(train.epoch(epoch), train=True, on_batch=on_batch if batch_hooks else None)
            if val is not None:
                logs.update(session.run_epoch(val.epoch(0), train=False, prefix="val_"))
            session.sync_state()
            saving = checkpoint_dir is not None and (epoch + 1) % checkpoint_every == 0
            if needs_weights_on_rank0 or saving:
                with phase("weight gather"):
                    gather_stages(session.plan, session.grid)
            if saving:
                with phase(f"checkpoint writing (epoch {epoch + 1})"):
                    checkpoint.save(model, os.path.join(checkpoint_dir, checkpoint.CKPT_PATTERN.format(epoch=epoch + 1)), session.world)
                    if world_rank == 0:
                        checkpoint.prune(checkpoint_dir, checkpoint_keep)
            with phase(f"callback on_epoch_end (epoch {epoch})"):
                callback_list.on_epoch_end(epoch, logs)
            if session.agree_to_stop():
                break
        with phase("callback on_train_end"):
            callback_list.on_train_end()
        with phase("weight gather"):
            gather_stages(session.plan, session.grid, to_all=gather == "all")
    return history


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
    batch_size = _check_batch(batch_size)
    session = Session(model, num_partitions, num_replicas, num_microbatches, "1f1b", balance, None, "pipeline", comm)
    data = source(session.plan.graph, x, y, sample_weight, None, batch_size, True)
    session.start(data.first)
    with distributed():
        broadcast_variables(session.world, model.variables, root=0)
        logs = session.run_epoch(data.epoch(0), train=False)
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
    batch_size = _check_batch(batch_size)
    session = Session(model, num_partitions, num_replicas, num_microbatches, "1f1b", balance, None, "pipeline", comm)
    graph = session.plan.graph
    data = source(graph, x, None, None, None, batch_size, False)
    runner = session.start(data.first, need_loss=False)
    specs = [graph.tensors[t] for t in graph.output_tensors]
    chunks: list[list[np.ndarray]] = [[] for _ in specs]
    with distributed():
        broadcast_variables(session.world, model.variables, root=0)
        for batch, idx in data.epoch(0):
            micro, norm = session.micro_batches(batch, idx)
            _, _, outs = runner.infer(micro, norm)
            # Each output's owners fill their rows (positions within the batch); a sum over
            # the world assembles the batch.
            local_parts = session.split(np.arange(len(idx)))
            for pos, spec in enumerate(specs):
                rows = np.zeros((len(idx),) + tuple(spec.shape), np.float64)
                if pos in session.stage.model_outputs:
                    slot = session.stage.model_outputs.index(pos)
                    for part, preds in zip(local_parts, outs):
                        rows[part] = np.asarray(preds[slot], np.float64)
                session.world.Allreduce(MPI.IN_PLACE, rows, op=MPI.SUM)
                chunks[pos].append(rows.astype(np_dtype(spec.dtype) if "float" in spec.dtype else np.float64))
    out = [np.concatenate(c) for c in chunks]
    return out[0] if len(out) == 1 else out
