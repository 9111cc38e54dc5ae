"""Input adapters: what the user passes as x / y / sample_weight (arrays, lists or dicts by
name, a batched tf.data.Dataset) as global batches, cut identically on every rank.

Every rank holds the same data; batches are cut from a seeded permutation, so no rank
ever waits for a step another rank does not run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hyparflow import keras_compat
from hyparflow.errors import ConfigError
from hyparflow.feed import Feed
from hyparflow.graph import ModelGraph
from hyparflow.replicas import InputContext, PerReplica, Shares

log = logging.getLogger(__name__)


def _as_list(data, names: list[str], what: str, allow_none: bool = False) -> list[Any]:
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
        if what != "sample_weight" and len(names) != 1:
            raise ConfigError(
                f"{what} is a single array but the model has {len(names)} of them ({names}); pass a list or a dict."
            )
        items = [data] * len(names)
    return [None if a is None else np.asarray(a) for a in items]


@dataclass
class Data:
    """Arrays aligned to the model's inputs and outputs."""

    x: list[np.ndarray]
    y: list[np.ndarray | None]
    sw: list[np.ndarray | None]  # None: no sample weights for that output (as Keras's None)
    shares: Shares | None = None  # a per-replica stream's batch: this replica's rows of the global batch

    def __len__(self) -> int:
        return len(self.x[0])

    def take(self, idx: np.ndarray | slice) -> Data:
        """The rows `idx` (a slice gives views, an index array copies)."""
        rows = lambda arrays: [None if a is None else a[idx] for a in arrays]  # noqa: E731
        return Data([a[idx] for a in self.x], rows(self.y), rows(self.sw))


def _prepare(graph: ModelGraph, x, y, sample_weight, class_weight, with_targets: bool) -> Data:
    xs = _as_list(x, graph.input_names, "x")
    ys = (
        _as_list(y, graph.output_names, "y", allow_none=not with_targets)
        if with_targets or y is not None
        else [None] * len(graph.output_names)
    )
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
            raise ConfigError(
                f"sample_weight for output '{name}' has shape {a.shape}; expected ({n}, ...): one row per sample."
            )
    if class_weight is not None:
        if len(graph.output_names) != 1:
            raise ConfigError(
                "class_weight works for single-output models only (as in Keras); use sample_weight per output."
            )
        labels = np.asarray(ys[0]).reshape(n, -1)
        labels = labels.argmax(axis=1) if labels.shape[1] > 1 else labels[:, 0].round().astype(int)
        classes, of_class = np.unique(labels, return_inverse=True)
        missing = sorted(set(classes.tolist()) - set(class_weight))
        if missing:
            raise ConfigError(f"class_weight has no weight for classes {missing}.")
        cw = np.array([class_weight[int(c)] for c in classes], np.float32)[of_class.reshape(-1)]
        sws = [cw if s is None else s * cw for s in sws]
    sws = [None if s is None else s.astype(np.float32, copy=False) for s in sws]
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

    def __init__(
        self, data: Data, batch_size: int, shuffle: bool = False, seed: int = 0, steps_per_epoch: int | None = None
    ):
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.seed = seed
        self.cycle = steps_per_epoch is not None  # epochs continue where the last stopped
        self.steps: int = steps_per_epoch if steps_per_epoch is not None else -(-len(data) // batch_size)
        self.first = data
        self.signature = shapes(data)

    def _pass(self, p: int) -> np.ndarray:
        n = len(self.data)
        return np.random.default_rng([self.seed, p]).permutation(n) if self.shuffle else np.arange(n)

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


class StreamSource:
    """Global batches from a stream Keras adapts: a batched `tf.data.Dataset`, a
    `keras.utils.PyDataset`, or a Python generator of batches.

    Only ranks whose stage reads inputs or targets iterate the stream (see `hyparflow.feed`);
    each iterates its own copy, which must yield the same batches on every rank (seed any
    shuffle), and its replica takes its share of every batch, so every rank runs the same
    number of steps and every sample counts once. A stage that reads nothing gets each
    batch's size from its replica's leader and yields batches without arrays. With
    `steps_per_epoch`, epochs continue through the stream, as in Keras.

    With `x` a `PerReplica`, each replica's readers open and iterate that replica's own
    stream instead, and agree on each step's sizes and loss divisors (`hyparflow.replicas`).
    """

    def __init__(
        self,
        x,
        graph: ModelGraph,
        with_targets: bool,
        steps_per_epoch: int | None = None,
        class_weight=None,
        feed: Feed | None = None,
    ):
        self.graph, self.with_targets, self.feed = graph, with_targets, feed
        self.continuing = steps_per_epoch is not None
        self.reads = feed is None or feed.reads
        self.per_replica: Feed | None = feed if isinstance(x, PerReplica) else None
        if self.per_replica is None and isinstance(x, PerReplica):
            raise ConfigError("PerReplica input needs a hyparflow call's feed.")
        mine: tuple | ConfigError | None = None
        if self.reads:
            try:
                per = self.per_replica
                stream = x.open(InputContext(per.replicas, per.replica)) if per is not None else x
                mine = self._open(stream, steps_per_epoch, class_weight)
            except ConfigError as e:
                mine = e
        info = self._agree(mine) if self.per_replica else feed.share(mine) if feed is not None else mine
        for found in (mine, info):
            if isinstance(found, ConfigError):
                raise ConfigError(str(found))
        assert isinstance(info, tuple)
        self.steps, self.signature, sample = info
        self.first = self._first if self.reads else sample
        self._warned = False

    def _agree(self, mine) -> tuple | ConfigError:
        """Per-replica streams: every reader's (steps, shapes, sample) on every rank, made one
        (the fewest steps when all are known; shapes without the batch size must match)."""
        assert self.per_replica is not None
        transport = self.per_replica.transport
        found = [(rank, info) for rank, info in enumerate(transport.allgather(mine)) if info is not None]
        for _, info in found:
            if isinstance(info, ConfigError):
                return info
        where = transport.grid.where if transport.grid is not None else str
        signatures = {rank: [None if s is None else (s[0][1:], s[1]) for s in info[1]] for rank, info in found}
        odd = [where(r) for r, sig in signatures.items() if sig != signatures[found[0][0]]]
        if odd:
            return ConfigError(
                f"The replicas' datasets yield different shapes or dtypes ({', '.join(odd)} differ from "
                f"{where(found[0][0])}): every replica's dataset must yield the same structure."
            )
        steps = [info[0] for _, info in found]
        if None not in steps and len(set(steps)) > 1 and transport.rank == 0:
            log.warning(
                "The replicas' datasets have %s batches (by reading rank): each epoch runs the fewest, %d.",
                steps,
                min(steps),
            )
        return None if None in steps else min(steps), signatures[found[0][0]], found[0][1][2]

    def _open(self, x, steps_per_epoch: int | None, class_weight) -> tuple:
        """Start the stream; (steps, the first batch's shapes, a two-sample slice of it)."""
        self.adapter = keras_compat.data_adapter(x, steps_per_epoch, class_weight)
        self._iterator = iter(self.adapter.get_numpy_iterator())
        element = next(self._iterator, None)
        if element is None:
            raise ConfigError("The data stream is empty: there is nothing to train on.")
        self._pending = [element]  # the peeked batch is the stream's first
        self._first = self._convert(element)
        steps = steps_per_epoch if steps_per_epoch is not None else self.adapter.num_batches
        return steps, shapes(self._first), self._first.take(np.arange(min(2, len(self._first))))

    def _convert(self, element) -> Data:
        x, y, sw = keras_compat.unpack_x_y_sample_weight(element)
        if self.with_targets and y is None:
            raise ConfigError("The data stream yields no targets: yield (x, y) or (x, y, sample_weight) batches.")
        return _prepare(self.graph, x, y if self.with_targets else None, sw, None, with_targets=self.with_targets)

    def _next(self):
        if self._pending:
            return self._pending.pop()
        element = next(self._iterator, None)
        if element is None and self.continuing:  # ran out: start the stream again
            self._iterator = iter(self.adapter.get_numpy_iterator())
            element = next(self._iterator, None)
        return element

    def epoch(self, epoch: int) -> Iterator[tuple[Data, np.ndarray]]:
        if not self.reads:
            yield from self._sizes()
            return
        if not self.continuing and not self._pending:  # each epoch (and each validation) from the start
            self._iterator = iter(self.adapter.get_numpy_iterator())
        step = 0
        while self.steps is None or step < self.steps:
            element = self._next()
            data = None if element is None else self._convert(element)
            if self.per_replica is not None:
                shares = self._replica_step(data)
                data = None if shares is None else Data(data.x, data.y, data.sw, shares)  # type: ignore[union-attr]
            sizes = [0] * self.width if data is None else self._sizes_of(data)
            if self.feed is not None:
                self.feed.announce(sizes)
            if data is None:
                break
            yield data, np.arange(sum(sizes))
            step += 1

    @property
    def width(self) -> int:
        """How many sizes the leader announces per batch."""
        return 1 if self.per_replica is None else self.per_replica.replicas

    @staticmethod
    def _sizes_of(data: Data) -> list[int]:
        return [len(data)] if data.shares is None else data.shares.sizes.tolist()

    def _replica_step(self, data: Data | None) -> Shares | None:
        """Per-replica streams: every replica's batch size and the global batch's loss
        divisors, summed over the replicas in one allreduce among this stage's readers; None
        when any replica's stream has ended (the epoch ends there on every rank)."""
        feed = self.per_replica
        assert feed is not None and feed.divisors is not None
        width = 1 + len(self.graph.output_names)
        local = np.zeros((feed.replicas, width))
        if data is not None and len(data):
            local[feed.replica] = [len(data), *feed.divisors(data)]
        total = np.empty_like(local)
        feed.transport.allreduce(local, total, "per-replica batch sizes", group="data")
        sizes = total[:, 0].astype(np.int64)
        if not sizes.all():
            left = np.flatnonzero(sizes).tolist()
            if left and not self._warned and feed.transport.rank == 0:
                log.warning(
                    "Replicas %s still had batches when replicas %s ran out: the epoch ends here on every rank and "
                    "their remaining batches are not used.",
                    left,
                    np.flatnonzero(sizes == 0).tolist(),
                )
            self._warned = True
            return None
        divisors = total[:, 1:].sum(axis=0)
        return Shares(sizes, np.where(np.isnan(divisors), 1.0, divisors))

    def _sizes(self) -> Iterator[tuple[Data, np.ndarray]]:
        """A stage that reads nothing: batches without arrays, as long as the leader's last."""
        assert self.feed is not None
        nothing: list[np.ndarray | None] = [None] * len(self.graph.output_names)
        step = 0
        while self.steps is None or step < self.steps:
            sizes = self.feed.next_sizes(self.width)
            if not sizes.any():
                break
            shares = None if self.per_replica is None else Shares(sizes, np.ones(len(nothing)))
            yield Data([], nothing, nothing, shares), np.arange(int(sizes.sum()))
            step += 1


def source(
    graph: ModelGraph,
    x,
    y,
    sample_weight,
    class_weight,
    batch_size: int | None,
    with_targets: bool,
    shuffle=False,
    seed=0,
    steps=None,
    feed: Feed | None = None,
) -> ArraySource | StreamSource:
    """The source for what the user passed as x (arrays: ArraySource; streams: StreamSource,
    iterated only where `feed` says this rank reads)."""
    if keras_compat.is_array_like((x, y, sample_weight)):
        data = _prepare(graph, x, y, sample_weight, class_weight, with_targets)
        return ArraySource(data, 32 if batch_size is None else batch_size, shuffle, seed, steps)
    if y is not None or sample_weight is not None:
        raise ConfigError(
            f"With x of type {type(x).__name__}, targets and sample weights come from x: do not pass y or "
            "sample_weight."
        )
    return StreamSource(x, graph, with_targets, steps, class_weight, feed)


def validation_sources(
    graph: ModelGraph,
    train,
    validation_data,
    validation_split: float,
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    steps: int | None,
    validation_steps: int | None,
    feed: Feed | None = None,
):
    """(training source, validation source or None) for fit's validation arguments. A
    validation split views the arrays' rows (no copy)."""
    if not 0.0 <= validation_split < 1.0:
        raise ConfigError(f"validation_split must be in [0, 1), got {validation_split}.")
    if validation_split and validation_data is None:
        if not isinstance(train, ArraySource):
            raise ConfigError(
                "validation_split needs arrays; with a dataset, PyDataset or generator pass validation_data."
            )
        data = train.data
        cut = int(len(data) * (1.0 - validation_split))
        if cut == 0 or cut == len(data):
            raise ConfigError(
                f"validation_split={validation_split} leaves no training or no validation samples out of {len(data)}."
            )
        train = ArraySource(data.take(slice(0, cut)), train.batch_size, shuffle, seed, steps)
        return train, ArraySource(
            data.take(slice(cut, len(data))), batch_size or train.batch_size, steps_per_epoch=validation_steps
        )
    if validation_data is None:
        return train, None
    if isinstance(validation_data, (tuple, list)):
        if len(validation_data) not in (2, 3):
            raise ConfigError(
                "validation_data must be (x, y), (x, y, sample_weight), a dataset, PyDataset or generator."
            )
        vx, vy, *vsw = validation_data
        sw = vsw[0] if vsw else None
        return train, source(graph, vx, vy, sw, None, batch_size, True, steps=validation_steps, feed=feed)
    return train, source(graph, validation_data, None, None, None, batch_size, True, steps=validation_steps, feed=feed)


def shapes(data: Data) -> list:
    """Per-array shapes and dtypes of the data (compared across ranks)."""
    return [None if a is None else (a.shape, str(a.dtype)) for a in data.x + data.y]
