"""The compiled loss and metrics of a Keras model, split per model output so that
each stage computes them for the outputs it produces.

Keras reduces a loss over every element of the batch: per sample, per token, per pixel.
`sum_over_batch_size` divides the sum of the weighted values by their element count
(after broadcasting with the sample weight), or by the count of unmasked elements when
the prediction carries a mask; `mean_with_sample_weight` by the sum of the (masked)
sample weights; `sum` does not divide. A micro-batch here contributes its sum divided
by that quantity *for the whole global batch*, so that contributions summed over
micro-batches, replicas and stages give exactly Keras's full-batch loss and gradient.

The global quantity must be known before the step, since every micro-batch's gradient
is scaled by it. `Objective.divisors` computes it on the host from the global batch:
the sample count, the sum of the sample weights, and mask counts, for masks that are a
function of the data alone: a mask that Keras builds from the model inputs without any
weight (`Embedding(mask_zero=True)`, `Masking` on an input, a layer's `compute_mask` of
an input) is recomputed by a small Keras model of just those ops, and `ignore_class`
from the targets. A mask that depends on weights or on the predictions (e.g. a loss
that masks its own values) cannot be known before the step: with a reduction that
divides by a count this is refused with an explanation; `reduction="sum"` works.

Losses that layers add during call (activity regularizers, `add_loss`) are taken to be
per-sample means, as Keras's activity regularizers are, and weighted by the
micro-batch's share of the global batch. Metric states are additive, so summing them
across replicas is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hyparflow.errors import ConfigError
from hyparflow.keras_compat import (
    apply_mask,
    compiled_loss,
    compiled_metrics,
    functional_graph,
    get_keras_mask,
    get_loss,
    get_metric,
    loss_elements,
    nodes_by_depth,
)

_BATCH_MEAN = ("sum_over_batch_size", "mean")
_REDUCTIONS = _BATCH_MEAN + ("sum", "mean_with_sample_weight")


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


def _mask_model(inputs, output, name: str, sample, runtime) -> Any:
    """A Keras model computing the mask of output `output` from the model inputs.

    Built from the graph's symbolic mask and checked against `runtime`, the mask Keras's
    own forward pass attached to the output on `sample`: the two can differ (a merge
    layer may drop at run time a mask the graph propagates), and Keras's fit uses the
    run-time one. Refused when the mask depends on weights: on a pipeline a rank holds
    current weights for its own stage only, so it could not count it."""
    mask = get_keras_mask(output)
    hint = "pass the padding as sample weights, or use a loss with reduction='sum'."
    if mask is None:
        raise ConfigError(f"Output '{name}' is masked at run time by a mask its graph does not show; {hint}")
    model = keras.Model(inputs, mask, name=f"{name}_mask")
    if model.weights:
        raise ConfigError(
            f"The mask of output '{name}' depends on weights ({model.weights[0].path}, ...), so its count over "
            f"the global batch, by which Keras divides the loss, is unknown before the step. Mask from the inputs "
            f"(e.g. Embedding(mask_zero=True)), {hint}"
        )
    if not np.array_equal(np.asarray(model(sample, training=False)), np.asarray(runtime)):
        raise ConfigError(f"Keras masks output '{name}' at run time unlike its graph, so it cannot be counted; {hint}")
    return model


def _symbolic_masks(model) -> bool:
    """Whether any tensor of the model's graph carries a mask (else no output can)."""
    nodes = nodes_by_depth(functional_graph(model)).values()
    return any(get_keras_mask(t) is not None for group in nodes for node in group for t in node.outputs)


class Objective:
    """Per-output losses, loss weights and metrics of a compiled model."""

    def __init__(
        self,
        model,
        output_names: list[str],
        x_sample: Sequence[np.ndarray],
        y_sample: Sequence[np.ndarray | None],
        pred_specs: Sequence[Any],
        need_loss: bool = True,
    ):
        compile_loss = compiled_loss(model)
        if need_loss and (compile_loss is None or getattr(model, "optimizer", None) is None):
            raise ConfigError(
                f"Model '{model.name}' is not compiled: call model.compile(optimizer=..., loss=...) "
                "before hyparflow.fit or evaluate."
            )
        self.names = output_names
        multi = len(output_names) > 1
        user_loss, weights = compile_loss if compile_loss is not None else (None, None)
        n_out = len(output_names)
        losses = _per_output(user_loss, output_names, "loss") if compile_loss is not None else [None] * n_out
        weights = _per_output(weights, output_names, "loss_weights") if weights is not None else [None] * n_out
        self.losses, self.loss_weights = [], []
        for y, spec, ident, lw, name in zip(y_sample, pred_specs, losses, weights, output_names, strict=True):
            if lw is not None and not isinstance(lw, (int, float)):
                raise ConfigError(f"loss_weights for output '{name}' must be a number, got {lw!r}.")
            self.losses.append(get_loss(ident, y, spec) if y is not None and ident is not None else None)
            self.loss_weights.append(1.0 if lw is None else float(lw))
        if need_loss and all(fn is None for fn in self.losses):
            raise ConfigError("No loss to compute: give model.compile a loss for at least one output, and its targets.")
        cm = compiled_metrics(model)
        user_metrics = _per_output(cm[0], output_names, "metrics") if cm is not None else [None] * n_out
        user_weighted = _per_output(cm[1], output_names, "weighted_metrics") if cm is not None else [None] * n_out
        self.metrics: list[list[tuple[Any, bool]]] = []
        for pos, (y, spec) in enumerate(zip(y_sample, pred_specs)):
            found = []
            for group, weighted in ((user_metrics[pos], False), (user_weighted[pos], True)):
                for ident in group if isinstance(group, (list, tuple)) else ([group] if group is not None else []):
                    if y is None:
                        continue
                    found.append((get_metric(ident, y, spec), weighted))
            self.metrics.append(found)
        self._name_metrics(multi)
        self.reductions = [None if fn is None else (fn.reduction or "none") for fn in self.losses]
        for fn, red in zip(self.losses, self.reductions):
            if fn is not None and red not in _REDUCTIONS:
                raise ConfigError(
                    f"Loss '{fn.name}' has reduction={red!r}; hyparflow needs a reduced loss "
                    "('sum_over_batch_size', 'sum' or 'mean_with_sample_weight')."
                )
        # Masks whose global count a divisor needs: a sparse crossentropy's ignore_class
        # (from the targets), and the prediction's (from the inputs; found by `_find_masks`).
        self.model, self.pred_specs = model, list(pred_specs)
        self.counted = [fn is not None and red != "sum" for fn, red in zip(self.losses, self.reductions)]
        self.ignore_class = [
            getattr(fn, "ignore_class", None) if c else None for fn, c in zip(self.losses, self.counted)
        ]
        self.pred_ranks = [len(spec.shape) for spec in pred_specs]
        self.mask_models = self._find_masks(list(x_sample))

    def _find_masks(self, xs: list[np.ndarray]) -> list[Any]:
        """Per output, a model recomputing the mask Keras's loss sees from the inputs, or
        None. Which outputs Keras masks is seen by running the whole model on a few samples
        `xs`: an objective is made while the rank holds every stage's weights."""
        found: list[Any] = [None] * len(self.losses)
        if not any(self.counted) or not _symbolic_masks(self.model):
            return found
        sample = xs if len(xs) > 1 else xs[0]  # Keras's structure for one input
        preds = keras.tree.flatten(self.model(sample, training=False))
        fn = functional_graph(self.model)
        if fn is None:
            return found
        inputs = fn.inputs
        for pos, (pred, spec, name) in enumerate(zip(preds, self.pred_specs, self.names)):
            runtime = get_keras_mask(pred)
            if self.counted[pos] and runtime is not None:
                found[pos] = _mask_model(inputs, spec, name, sample, runtime)
        return found

    def _name_metrics(self, multi: bool) -> None:
        """Give metrics the names Keras logs them under (CompileMetrics.result): the
        output's name first with several outputs; a repeated name gets `_1`, `_2`, ...,
        or, for a weighted metric, the prefix `weighted_` first."""
        seen: dict[str, int] = {}
        for weighted in (False, True):
            for name, ms in zip(self.names, self.metrics):
                for m, w in ms:
                    if w != weighted:
                        continue
                    prefix = f"{name}_" if multi else ""
                    full = prefix + m.name
                    if full in seen and weighted:
                        full = f"{prefix}weighted_{m.name}"
                    if full in seen:
                        seen[full] += 1
                        full = f"{full}_{seen[full] - 1}"
                    else:
                        seen[full] = 1
                    m.name = full

    # ---- normalisation ---------------------------------------------------------
    def _global_mask(self, pos: int, xs: list[np.ndarray], y: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
        """The mask Keras's loss would use for output `pos` on the global batch `idx` of
        inputs `xs` and this output's targets `y`, or None."""
        mask = None
        if self.mask_models[pos] is not None:
            batch = [x[idx] for x in xs]
            mask = np.asarray(self.mask_models[pos](batch if len(batch) > 1 else batch[0], training=False))
        if self.ignore_class[pos] is not None:
            labels = np.asarray(y)[idx]
            labels = labels[..., 0] if labels.ndim == self.pred_ranks[pos] and labels.shape[-1] == 1 else labels
            valid = labels != self.ignore_class[pos]
            mask = valid if mask is None else mask & valid
        return mask

    def divisors(
        self,
        xs: list[np.ndarray],
        ys: list,
        sws: list,
        idx: np.ndarray,
        positions: Sequence[int] | None = None,
        fill: float = 1.0,
    ) -> np.ndarray:
        """Per output, the quantity of global batch `idx` that `stage_loss` divides by:
        the sample count, the count of unmasked elements, the sum of the (masked) sample
        weights, or 1 for `sum`. Computed the same way, before the step, on every rank that
        computes the loss of an output in `positions` (default: all; the others are `fill`)."""
        out = np.full(len(self.losses), fill, np.float64)
        for pos in range(len(self.losses)) if positions is None else positions:
            fn, red = self.losses[pos], self.reductions[pos]
            if fn is None or not self.counted[pos]:
                continue
            mask = self._global_mask(pos, xs, ys[pos], idx)
            sw = None if sws[pos] is None else sws[pos][idx]
            if red in _BATCH_MEAN:
                out[pos] = len(idx) if mask is None else np.count_nonzero(mask)
            elif sw is None and mask is None:
                out[pos] = len(idx)
            else:
                out[pos] = float(tf.reduce_sum(apply_mask(sw, mask, dtype=fn.dtype, reduction=red)))
        return out

    def _check_mask(self, pos: int, mask) -> None:
        """At trace time: the mask the loss sees must be the one `divisors` counted."""
        expected = self.mask_models[pos] is not None or self.ignore_class[pos] is not None
        if self.reductions[pos] == "sum" or expected == (mask is not None):
            return
        name = self.names[pos]
        if expected:
            raise ConfigError(
                f"Output '{name}' carries a Keras mask, but it does not reach the stage that computes the loss: "
                "masks do not cross stage boundaries yet. Choose cuts (balance=) that keep the masking layer and "
                "every layer up to the output in one stage, or pass the padding as sample weights."
            )
        raise ConfigError(
            f"The loss of output '{name}' masks its values with a mask hyparflow cannot count before the step "
            f"(it depends on the predictions), and reduction={self.reductions[pos]!r} divides by that count over "
            "the global batch. Use reduction='sum', or sample weights."
        )

    def _divisor(self, pos: int, values, mask, pred, weighted: bool, global_value):
        """`stage_loss`'s divisor for one micro-batch: `global_value` (from `divisors`)
        scaled to elements. Keras divides by the element count of the weighted values,
        with a mask by it times unmasked/total elements of the mask."""
        red, count = self.reductions[pos], tf.cast(tf.size(values), tf.float32)
        if red == "sum":
            return tf.constant(1.0)
        if red in _BATCH_MEAN and mask is not None:
            return global_value * count / tf.cast(tf.size(mask), tf.float32)
        if red == "mean_with_sample_weight" and (weighted or mask is not None):
            return global_value
        if len(values.shape) == 0:  # an already reduced value: taken as a mean over the batch
            return global_value / tf.cast(tf.shape(pred)[0], tf.float32)
        return global_value * count / tf.cast(tf.shape(pred)[0], tf.float32)

    def stage_loss(self, positions, ys, preds, sws, divisors) -> tuple[Any, list[Any]]:
        """Loss contribution of a stage's outputs on one micro-batch, and per-output unweighted parts."""
        total = tf.constant(0.0)
        parts = []
        for pos, y, pred, sw in zip(positions, ys, preds, sws):
            fn = self.losses[pos]
            if fn is None:
                parts.append(tf.constant(0.0))
                continue
            values, mask = loss_elements(fn, y, pred, sw)
            self._check_mask(pos, mask)
            divisor = self._divisor(pos, values, mask, pred, sw is not None, tf.cast(divisors[pos], tf.float32))
            value = tf.math.divide_no_nan(tf.cast(tf.reduce_sum(values), tf.float32), divisor)
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
