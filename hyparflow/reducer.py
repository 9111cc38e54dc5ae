"""The replica reducer: sums a stage's accumulated gradients over its replicas (one fused
buffer, reused every step), and makes every stage agree on skipping a step whose scaled
gradients overflowed (mixed_float16), so all stages skip and lower the scale together."""

from __future__ import annotations

import numpy as np

from hyparflow.transport import Transport, aligned_empty


class Reducer:
    def __init__(self, transport: Transport, loss_scaled: bool):
        self.transport, self.loss_scaled = transport, loss_scaled
        self._summed: np.ndarray | None = None

    @property
    def needed(self) -> bool:
        """Whether a step must reduce at all (replicas to average, or a scale to agree on)."""
        return self.transport.group_size("data") > 1 or self.loss_scaled

    def reduce(self, flat: np.ndarray) -> np.ndarray:
        """The sum of `flat` over this stage's replicas, NaN everywhere if any stage's
        reduced gradients are not finite. The result buffer is reused by the next call."""
        if self._summed is None or self._summed.shape != flat.shape:
            self._summed = aligned_empty(flat.shape, flat.dtype)
        summed = self._summed
        self.transport.allreduce(flat, summed, "gradient allreduce", group="data")
        if self.loss_scaled:
            finite = np.array([float(np.isfinite(summed).all())])
            every = np.empty_like(finite)
            self.transport.allreduce(finite, every, "loss-scale agreement")
            if every[0] < self.transport.size:
                summed[:] = np.nan
        return summed
