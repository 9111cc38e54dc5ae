"""The gradient reducer: sums a stage's gradients over its replicas in buckets started
during the step's last backward, sums tied weights' gradients over every stage and
replica that holds them, and makes every stage agree on skipping a step whose scaled
gradients overflowed (mixed_float16), so all stages skip and lower the scale together.

Buckets run in backward order (last variables first, as PyTorch DDP's and Horovod's do):
the compiled backward hands each one over (`post`) as soon as its variables' gradients
are complete, so its allreduce overlaps the backward of the layers before it, and only
what is left when the backward ends is waited on (`finish`).

An embedding's gradient, sparse in Keras (one row per token occurrence), reaches the
optimizer as those rows where they matter to it (`gather_rows`): every micro-batch's, of
every replica, and of every stage holding a tied one (unless one holder's is dense: Keras
then sums the two densely).

With an optimizer's `global_clipnorm`, the stages' sums of squared gradients are summed
over the pipeline (`clip_scale`), so every stage clips by the whole model's norm, as
Keras's one optimizer does (a sparse gradient's rows counted one by one, as Keras's are).

A tied variable (a layer called on several stages, e.g. an embedding reused for the
logits) has one copy per holding stage, each with its own optimizer state. Each copy's
gradient is only its stage's share; all-reducing the shares over the tied group of those
stages (every replica included, which is the replica sum too) gives every copy the full
gradient, so the copies take the same update and stay bit-identical, as Megatron-LM's
embedding group and DeepSpeed's tied-module all-reduce do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from hyparflow.transport import Transport, aligned_empty

MIN_BUCKET, MAX_BUCKET = 256 * 1024, 32 * 1024 * 1024  # bytes


def bucket_bounds(sizes: Sequence[int], bucket_bytes: float) -> list[tuple[int, int]]:
    """Variable index ranges [a, b) of at least `bucket_bytes` of gradients each (as float32)
    (the first-made bucket may be smaller), from the last variable back to the first."""
    bounds, stop, acc = [], len(sizes), 0
    for i in range(len(sizes) - 1, -1, -1):
        acc += 4 * sizes[i]
        if acc >= bucket_bytes or i == 0:
            bounds.append((i, stop))
            stop, acc = i, 0
    return bounds


def bucket_bytes_for(total_bytes: int) -> float:
    """HYPARFLOW_BUCKET_MB, else an eighth of the stage's gradients within 256 KiB..32 MiB:
    enough buckets to overlap, each large enough to cost little more than its bytes."""
    raw = os.environ.get("HYPARFLOW_BUCKET_MB")
    return float(raw) * 2**20 if raw else min(max(total_bytes / 8, MIN_BUCKET), MAX_BUCKET)


class Reducer:
    def __init__(
        self, transport: Transport, loss_scaled: bool, variables: Sequence[Any], tied: Sequence[tuple[Any, list[int]]]
    ):
        """`variables`: the stage's trainable variables, in the order of the flat gradient;
        `tied`: the plan's (variable, stage indices) for variables held by several stages."""
        self.transport, self.loss_scaled = transport, loss_scaled
        sizes = [int(np.prod(v.shape)) for v in variables]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(int)
        self.buckets = bucket_bounds(sizes, bucket_bytes_for(4 * int(offsets[-1])))
        self._slices = [slice(offsets[a], offsets[b]) for a, b in self.buckets]
        self._parts = [slice(a, b) for a, b in zip(offsets, offsets[1:])]  # each variable's in the flat gradient
        place = {id(v): (k, tuple(stages)) for k, (v, stages) in enumerate(tied)}
        self.tied: dict[tuple[int, ...], list[int]] = {}  # stage set -> indices of its variables
        self._tied_key: dict[int, int] = {}  # tied variable's index -> its position in `tied`, alike on every holder
        for i, v in enumerate(variables):
            if id(v) in place:
                self._tied_key[i], stages = place[id(v)]
                self.tied.setdefault(stages, []).append(i)
        size = int(offsets[-1]) if self.needed else 0
        # float32, or float64 for float64 weights: their sums must not lose what Keras keeps
        self.dtype = np.float64 if any("float64" in str(v.dtype) for v in variables) else np.float32
        self._local = aligned_empty((size,), self.dtype)  # this rank's gradients
        self._summed = aligned_empty((size,), self.dtype)
        self._requests: list = []
        self._posted = 0
        self.overflowed = False  # the last `finish` found a stage's loss-scaled gradients not finite

    @property
    def needed(self) -> bool:
        """Whether a step must reduce at all (replicas or tied copies to sum, or a scale to agree on)."""
        return self.transport.group_size("data") > 1 or bool(self.tied) or self.loss_scaled

    def begin(self) -> None:
        """Forget what an interrupted step handed over (say, a KeyboardInterrupt inside the
        last backward of a one-rank, loss-scaled fit); called as each step starts."""
        self._requests, self._posted = [], 0

    def post(self, k: int, values: np.ndarray) -> None:
        """Start summing bucket `k` (`values`: its variables' flat gradients) over the
        replicas. Called from the compiled backward, in bucket order on every replica."""
        t0 = time.perf_counter()
        part = self._local[self._slices[k]]
        part[...] = values
        self.transport.progress(self._requests)
        self._requests += self.transport.iallreduce(part, self._summed[self._slices[k]], group="data")
        self._posted += 1
        if self.transport.timeline is not None:
            self.transport.timeline.add(f"allreduce of bucket {k} started", "bucket", t0, args={"bytes": part.nbytes})

    def finish(self) -> np.ndarray:
        """The step's gradients summed over this stage's replicas (over the tied group for
        tied variables), NaN everywhere if any stage's reduced gradients are not finite.
        The result buffer is reused by the next step."""
        if self._posted != len(self.buckets):
            raise RuntimeError(f"the backward handed over {self._posted} of {len(self.buckets)} gradient buckets")
        self.transport.wait(self._requests, "gradient allreduce")
        self._requests, self._posted = [], 0
        local, summed = self._local, self._summed
        for stages in sorted(self.tied):  # one order on every rank of overlapping groups
            slices = [self._parts[i] for i in self.tied[stages]]
            part = np.concatenate([local[s] for s in slices])
            total = np.empty_like(part)
            self.transport.allreduce(part, total, f"tied gradient allreduce over stages {list(stages)}", group=stages)
            offset = 0
            for s in slices:
                n = s.stop - s.start
                summed[s] = total[offset : offset + n]
                offset += n
        self.overflowed = False
        if self.loss_scaled:
            finite = np.array([float(np.isfinite(summed).all())])
            every = np.empty_like(finite)
            self.transport.allreduce(finite, every, "loss-scale agreement")
            self.overflowed = bool(every[0] < self.transport.size)
            if self.overflowed:
                summed[:] = np.nan
        return summed

    def gather_rows(self, rows: dict[int, list[tuple[np.ndarray, np.ndarray]]]) -> dict[int, tuple]:
        """The sparse gradients Keras would hand the optimizer, as (values, indices) by
        variable, from this rank's backwards' `rows`: joined over the replicas, and for a
        tied variable over its holders too, left out where a holder's gradient was dense."""
        local = {i: _joined(parts) for i, parts in rows.items()}
        untied = {i: r for i, r in local.items() if i not in self._tied_key}
        out = dict(untied)
        if untied and self.transport.group_size("data") > 1:  # alike on every replica
            every = self.transport.allgather_objects(untied, "sparse gradients", group="data")
            out = {i: _joined([e[i] for e in every]) for i in untied}
        for stages in sorted(self.tied):  # one order on every rank of overlapping groups
            what = f"sparse gradients of stages {list(stages)}"
            key = {i: self._tied_key[i] for i in self.tied[stages]}
            every = self.transport.allgather_objects({k: i in local for i, k in key.items()}, what, group=stages)
            both = {i: k for i, k in key.items() if all(e[k] for e in every)}  # else Keras's is dense
            if both:
                every = self.transport.allgather_objects({k: local[i] for i, k in both.items()}, what, group=stages)
                out.update({i: _joined([e[k] for e in every]) for i, k in both.items()})
        if self.overflowed:  # the step is skipped everywhere: its sparse gradients too
            out = {i: (np.full_like(v, np.nan), k) for i, (v, k) in out.items()}
        return out

    def clip_scale(self, squares: float, clip: float) -> float:
        """Keras's `clip_by_global_norm` factor for the whole model's gradients, given this
        stage's sum of their squares (NaN when the norm is not finite)."""
        total = np.empty(1, np.float32)
        self.transport.allreduce(np.array([squares], np.float32), total, "global gradient norm", group="pipe")
        norm = np.sqrt(total[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float32(clip) * np.minimum(np.float32(1) / norm, np.float32(1 / clip)) + (norm - norm))


def _joined(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sparse gradients (values, indices) as one."""
    return np.concatenate([v for v, _ in parts]), np.concatenate([k for _, k in parts])
