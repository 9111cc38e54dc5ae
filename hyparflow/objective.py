"""The compiled loss and metrics of a Keras model, split per model output so that
each stage computes them for the outputs it produces.

Micro-batch losses are normalised by the *global* batch (its sample count, or the sum
of its sample weights), so that summing them over micro-batches, replicas and stages
gives exactly the loss Keras computes on the whole batch, and gradients add up to its
gradient. Metric states are additive, so summing them across replicas is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from hyparflow.errors import ConfigError
from hyparflow.keras_compat import compiled_loss, compiled_metrics, get_keras_mask, get_loss, get_metric, reduce_weighted_values

_BATCH_MEAN = ("sum_over_batch_size", "mean")


def _per_output(spec, names: list[str], what: str) -> list[Any]:
    """Spread a compile() argument (single, list or dict by output name) over the outputs."""
    if isinstance(spec, dict):
        unknown = set(spec) - set(names)
        if unknown:
            raise ConfigError(f"{what} names unknown outputs {sorted(unknown)}; the model's outputs are {names}.")
        return [spec.get(n) for n in names]
    if isinstance(spec, (list, tuple)) and len(names) > 1:
        if len(spec) != len(names):
            raise ConfigError(f"{what} has {len(spec)} entries but the model has {len(names)} outputs {names}.")
        return list(spec)
    return [spec] * len(names)


class Objective:
    """Per-output losses, loss weights and metrics of a compiled model."""

    def __init__(self, model, output_names: list[str], y_sample: Sequence[np.ndarray | None], pred_specs: Sequence[Any], need_loss: bool = True):
        compile_loss = compiled_loss(model)
        if need_loss and (compile_loss is None or getattr(model, "optimizer", None) is None):
            raise ConfigError(f"Model '{model.name}' is not compiled: call model.compile(optimizer=..., loss=...) before hyparflow.fit or evaluate.")
        self.names = output_names
        multi = len(output_names) > 1
        user_loss, weights = compile_loss if compile_loss is not None else (None, None)
        losses = _per_output(user_loss, output_names, "loss") if compile_loss is not None else [None] * len(output_names)
        weights = _per_output(weights, output_names, "loss_weights") if weights is not None else [None] * len(output_names)
        self.losses, self.loss_weights = [], []
        for y, spec, ident, lw, name in zip(y_sample, pred_specs, losses, weights, output_names, strict=True):
            if lw is not None and not isinstance(lw, (int, float)):
                raise ConfigError(f"loss_weights for output '{name}' must be a number, got {lw!r}.")
            self.losses.append(get_loss(ident, y, spec) if y is not None and ident is not None else None)
            self.loss_weights.append(1.0 if lw is None else float(lw))
        if need_loss and all(fn is None for fn in self.losses):
            raise ConfigError("No loss to compute: give model.compile a loss for at least one output (and targets for it).")
        cm = compiled_metrics(model)
        user_metrics = _per_output(cm[0], output_names, "metrics") if cm is not None else [None] * len(output_names)
        user_weighted = _per_output(cm[1], output_names, "weighted_metrics") if cm is not None else [None] * len(output_names)
        self.metrics: list[list[tuple[Any, bool]]] = []
        for pos, (y, spec) in enumerate(zip(y_sample, pred_specs)):
            found = []
            for group, weighted in ((user_metrics[pos], False), (user_weighted[pos], True)):
                for ident in group if isinstance(group, (list, tuple)) else ([group] if group is not None else []):
                    if y is None:
                        continue
                    m = get_metric(ident, y, spec)
                    if multi:
                        m.name = f"{output_names[pos]}_{m.name}"
                    found.append((m, weighted))
            self.metrics.append(found)
        self.reductions = [None if fn is None else (fn.reduction or "none") for fn in self.losses]
        for fn, red in zip(self.losses, self.reductions):
            if fn is not None and red not in _BATCH_MEAN + ("sum", "mean_with_sample_weight"):
                raise ConfigError(
                    f"Loss '{fn.name}' has reduction={red!r}; hyparflow needs a reduced loss ('sum_over_batch_size', 'sum' or 'mean_with_sample_weight')."
                )

    @property
    def divisor_kinds(self) -> list[str]:
        """Per output: 'count' (global samples), 'weights' (global sum of sample weights) or 'one'."""
        kinds = []
        for red in self.reductions:
            kinds.append("count" if red in _BATCH_MEAN else "weights" if red == "mean_with_sample_weight" else "one")
        return kinds

    def stage_loss(self, positions, ys, preds, sws, divisors) -> tuple[Any, list[Any]]:
        """Loss contribution of a stage's outputs on one micro-batch, and per-output unweighted parts."""
        total = tf.constant(0.0)
        parts = []
        for pos, y, pred, sw in zip(positions, ys, preds, sws):
            fn = self.losses[pos]
            if fn is None:
                parts.append(tf.constant(0.0))
                continue
            y_p = tf.cast(pred, fn.dtype)
            values = fn.call(tf.cast(y, fn.dtype), y_p)
            mask = get_keras_mask(pred)
            values = reduce_weighted_values(values, sample_weight=sw, mask=mask, reduction="none", dtype=fn.dtype)
            value = tf.cast(tf.reduce_sum(values), tf.float32)
            if self.reductions[pos] in _BATCH_MEAN:
                per_sample = tf.cast(tf.size(values), tf.float32) / tf.cast(tf.maximum(tf.shape(values)[0], 1), tf.float32)
                value = value / (divisors[pos] * per_sample)
            elif self.reductions[pos] == "mean_with_sample_weight":
                value = value / divisors[pos]
            parts.append(value)
            total = total + value * self.loss_weights[pos]
        return total, parts

    @staticmethod
    def regularization(losses) -> Any:
        if not losses:
            return tf.constant(0.0)
        return tf.add_n([tf.cast(tf.reduce_sum(x), tf.float32) for x in losses])

    def update_metrics(self, positions, ys, preds, sws) -> None:
        for pos, y, pred, sw in zip(positions, ys, preds, sws):
            for metric, weighted in self.metrics[pos]:
                metric.update_state(y, pred, sample_weight=sw if weighted else None)

    # ---- state exchange for exact aggregation -------------------------------------
    def metric_state(self, owned: Sequence[int]) -> np.ndarray:
        """Flat state of all metrics; zeros for outputs this rank does not own."""
        out = []
        for pos, ms in enumerate(self.metrics):
            for m, _ in ms:
                for v in m.variables:
                    value = np.asarray(v.numpy(), np.float64).reshape(-1)
                    out.append(value if pos in owned else np.zeros_like(value))
        return np.concatenate(out) if out else np.zeros(0)

    def metric_results(self, state: np.ndarray) -> dict[str, float]:
        """Results of all metrics for an aggregated `state`; this rank's own state is kept."""
        results, i = {}, 0
        for ms in self.metrics:
            for m, _ in ms:
                saved = [v.numpy() for v in m.variables]
                for v in m.variables:
                    n = int(np.prod(v.shape))
                    v.assign(state[i : i + n].reshape(v.shape).astype(v.dtype))
                    i += n
                results[m.name] = float(np.asarray(m.result()))
                for v, s in zip(m.variables, saved):
                    v.assign(s)
        return results

    def reset_metrics(self) -> None:
        for ms in self.metrics:
            for m, _ in ms:
                m.reset_state()
