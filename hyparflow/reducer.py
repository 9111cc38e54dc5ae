"""The gradient reducer: sums a stage's accumulated gradients over its replicas (one fused
buffer, reused every step), sums tied weights' gradients over every stage and replica that
holds them, and makes every stage agree on skipping a step whose scaled gradients
overflowed (mixed_float16), so all stages skip and lower the scale together.

A tied variable (a layer called on several stages, e.g. an embedding reused for the
logits) has one copy per holding stage, each with its own optimizer state. Each copy's
gradient is only its stage's share; all-reducing the shares over the tied group of those
stages (every replica included, which is the replica sum too) gives every copy the full
gradient, so the copies take the same update and stay bit-identical, as Megatron-LM's
embedding group and DeepSpeed's tied-module all-reduce do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hyparflow.transport import Transport, aligned_empty


class Reducer:
    def __init__(
        self, transport: Transport, loss_scaled: bool, variables: Sequence[Any], tied: Sequence[tuple[Any, list[int]]]
    ):
        """`variables`: the stage's trainable variables, in the order of the flat gradient;
        `tied`: the plan's (variable, stage indices) for variables held by several stages."""
        self.transport, self.loss_scaled = transport, loss_scaled
        self._summed: np.ndarray | None = None
        stages_of = {id(v): tuple(stages) for v, stages in tied}
        self.tied: dict[tuple[int, ...], list[slice]] = {}  # stage set -> its variables' slices of the flat gradient
        offset = 0
        for v in variables:
            n = int(np.prod(v.shape))
            if id(v) in stages_of:
                self.tied.setdefault(stages_of[id(v)], []).append(slice(offset, offset + n))
            offset += n

    @property
    def needed(self) -> bool:
        """Whether a step must reduce at all (replicas or tied copies to sum, or a scale to agree on)."""
        return self.transport.group_size("data") > 1 or bool(self.tied) or self.loss_scaled

    def reduce(self, flat: np.ndarray) -> np.ndarray:
        """The sum of `flat` over this stage's replicas (over the tied group for tied
        variables), NaN everywhere if any stage's reduced gradients are not finite. The
        result buffer is reused by the next call."""
        if self._summed is None or self._summed.shape != flat.shape:
            self._summed = aligned_empty(flat.shape, flat.dtype)
        summed = self._summed
        self.transport.allreduce(flat, summed, "gradient allreduce", group="data")
        for stages in sorted(self.tied):  # one order on every rank of overlapping groups
            slices = self.tied[stages]
            part = np.concatenate([flat[s] for s in slices])
            total = np.empty_like(part)
            self.transport.allreduce(part, total, f"tied gradient allreduce over stages {list(stages)}", group=stages)
            offset = 0
            for s in slices:
                n = s.stop - s.start
                summed[s] = total[offset : offset + n]
                offset += n
        if self.loss_scaled:
            finite = np.array([float(np.isfinite(summed).all())])
            every = np.empty_like(finite)
            self.transport.allreduce(finite, every, "loss-scale agreement")
            if every[0] < self.transport.size:
                summed[:] = np.nan
        return summed
