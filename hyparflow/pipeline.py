"""Pipeline schedules and the per-rank stage executor.

A step splits this replica's share of the global batch into micro-batches. Each stage
runs forwards and backwards in the order its schedule gives (GPipe: all forwards, then
all backwards; 1F1B: warm-up forwards, then one forward one backward), receiving
boundary activations from earlier stages and partial errors from later ones, and
accumulating its variables' gradients. After the last backward the accumulated
gradients are summed across replicas in one fused buffer and applied by the user's
optimizer to this stage's variables only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hyparflow.comm import Grid, Transport, aligned_empty, to_numpy, to_tensor
from hyparflow.errors import ConfigError
from hyparflow.failures import phase
from hyparflow.graph import np_dtype
from hyparflow.keras_compat import optimizer_variables_for
from hyparflow.objective import Objective
from hyparflow.partition import Plan

log = logging.getLogger("hyparflow")

SCHEDULES = ("1f1b", "gpipe")
FORWARD, BACKWARD = "F", "B"


def schedule(kind: str, num_stages: int, stage: int, num_micro: int) -> list[tuple[str, int]]:
    """The (op, micro-batch) sequence one stage runs in a training step."""
    if kind == "gpipe":
        return [(FORWARD, m) for m in range(num_micro)] + [(BACKWARD, m) for m in range(num_micro)]
    if kind != "1f1b":
        raise ConfigError(f"schedule={kind!r}: expected one of {SCHEDULES}.")
    warmup = min(num_stages - stage - 1, num_micro)
    ops = [(FORWARD, m) for m in range(warmup)]
    for f in range(warmup, num_micro):
        ops += [(FORWARD, f), (BACKWARD, f - warmup)]
    ops += [(BACKWARD, b) for b in range(num_micro - warmup, num_micro)]
    return ops


@dataclass
class MicroBatch:
    """What one stage reads from the data for one micro-batch (NumPy arrays)."""

    size: int
    inputs: list[np.ndarray]  # the stage's model inputs, in stage.data_inputs order
    targets: list[np.ndarray]  # for the stage's model outputs, in stage.model_outputs order
    weights: list[np.ndarray | None]  # sample weights, likewise (None: unweighted)


@dataclass
class StepNorm:
    """Normalisers that make micro-batch losses add up to the global-batch loss."""

    divisors: np.ndarray  # per model output: Objective.divisors of the global batch
    reg_scale: float  # 1 / micro-batches run by all replicas of a stage this step (weight regularizers count once)
    count: int  # samples in the global batch: call-time losses (activity regularizers) are per-sample means


@dataclass
class _Step:
    """Bookkeeping of one training step on one stage."""

    fwd_posted: dict
    bwd_posted: dict
    divisors: Any
    parts: np.ndarray
    loss: float = 0.0
    pending: list = field(default_factory=list)  # (buffer, request) of sends in flight
    stash: dict = field(default_factory=dict)  # micro-batch -> what its backward needs


def _optimizer_for(optimizer, model, variables):
    """The model's optimizer if it is unbuilt or built for exactly `variables`; else (it was
    built for another layout by an earlier fit) a fresh one carrying its state over."""
    from hyparflow.checkpoint import optimizer_state, restore_optimizer_state

    if not getattr(optimizer, "built", False) or {id(v) for v in optimizer_variables_for(optimizer)} == {id(v) for v in variables}:
        return optimizer
    fresh = optimizer.__class__.from_config(optimizer.get_config())
    restore_optimizer_state(fresh, model, variables, optimizer_state(optimizer, model))
    model.optimizer = fresh
    return fresh


class StageRunner:
    """Runs this rank's stage: training steps, forward-only passes, state transfers.

    `timers` accumulates seconds of compute, waiting on peers and gradient allreduce;
    `StageRunner.last` is the newest runner of this process, for profilers and benchmarks.
    """

    last: StageRunner | None = None

    def __init__(self, plan: Plan, grid: Grid, objective: Objective, optimizer, schedule_kind: str = "1f1b"):
        self.plan, self.grid, self.objective = plan, grid, objective
        self.net = Transport(grid)
        self.stage = st = plan.stages[grid.stage]
        self.schedule_kind = schedule_kind
        tensors = plan.graph.tensors
        self.tag = {t: 2 * i for i, t in enumerate(plan.boundary)}
        self.src = {t: plan.stage_of_call[tensors[t].producer] for t in st.recv}
        self.send_ids = list(dict.fromkeys(t for t, _ in st.send))
        self.dests = {t: [d for u, d in st.send if u == t] for t in self.send_ids}
        self.recv_float = [t for t in st.recv if tensors[t].is_float]
        self.send_float = [t for t in self.send_ids if tensors[t].is_float]
        self.variables = st.trainable_variables
        self.optimizer = _optimizer_for(optimizer, plan.graph.model, self.variables)
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.fused = not self.send_float
        self.acc = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in self.variables]
        self.timers = {"compute": 0.0, "wait": 0.0, "allreduce": 0.0}
        self._summed: np.ndarray | None = None  # allreduce result buffer, reused every step
        self._build_functions()
        StageRunner.last = self

    # ---- compiled pieces -------------------------------------------------------
    def _build_functions(self):
        st, obj = self.stage, self.objective
        data_ids = list(st.data_inputs)  # model input position i is tensor index i

        def forward(recv_vals, data_vals, ys, sws, divisors, reg_scale, training):
            feeds = dict(zip(st.recv, recv_vals))
            feeds.update(zip(data_ids, data_vals))
            out = st.forward(feeds, training=training)
            preds = [out[t] for t in st.output_tensors]
            loss, per_output = obj.stage_loss(st.model_outputs, ys, preds, sws, divisors)
            # reg_scale[0]: weight regularizers, once per step; reg_scale[1]: this micro-batch's
            # share of the global batch, for per-sample-mean losses added in call()
            reg = obj.regularization(st.weight_losses) * reg_scale[0] + obj.regularization(st.call_losses) * reg_scale[1]
            obj.update_metrics(st.model_outputs, ys, preds, sws)
            return [out[t] for t in self.send_ids], loss + reg, per_output, preds

        def train_forward(recv_vals, data_vals, ys, sws, divisors, reg_scale):
            """Also returns the loss to differentiate: scaled as the optimizer asks
            (LossScaleOptimizer under mixed_float16), so every stage's gradients are scaled alike."""
            sends, loss, per_output, _ = forward(recv_vals, data_vals, ys, sws, divisors, reg_scale, True)
            scaled = self.optimizer.scale_loss(loss) if hasattr(self.optimizer, "scale_loss") else loss
            return sends, loss, scaled, per_output

        def fused_step(recv_vals, data_vals, ys, sws, divisors, reg_scale):
            float_in = [v for t, v in zip(st.recv, recv_vals) if t in self.recv_float]
            with tf.GradientTape() as tape:
                tape.watch(float_in)
                sends, loss, scaled, per_output = train_forward(recv_vals, data_vals, ys, sws, divisors, reg_scale)
            grads = tape.gradient(scaled, self.variables + float_in, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            accumulate(grads[: len(self.variables)])
            return sends, grads[len(self.variables) :], loss, per_output

        def accumulate(grads):
            for a, g in zip(self.acc, grads):
                a.assign_add(tf.cast(tf.convert_to_tensor(g), a.dtype))

        def flat_grads():
            return tf.concat([tf.reshape(tf.cast(a, tf.float32), [-1]) for a in self.acc], 0)

        def apply(flat):
            sizes = [int(np.prod(v.shape)) for v in self.variables]
            parts = tf.split(flat, sizes) if sizes else []
            apply_local([tf.reshape(p, v.shape) for p, v in zip(parts, self.variables)])

        def apply_local(grads):
            self.optimizer.apply([tf.cast(g, v.dtype) for g, v in zip(grads, self.variables)], self.variables)
            for a in self.acc:
                a.assign(tf.zeros_like(a))

        def infer(recv_vals, data_vals, ys, sws, divisors, reg_scale):
            return forward(recv_vals, data_vals, ys, sws, divisors, reg_scale, False)

        self._train_forward = tf.function(train_forward)
        self._fused_step = tf.function(fused_step)
        self._accumulate = tf.function(accumulate)
        self._flat_grads = tf.function(flat_grads)
        self._apply = tf.function(apply)
        # Without replicas there is nothing to reduce: apply the accumulators in place.
        self._apply_accumulated = tf.function(lambda: apply_local([a.value() for a in self.acc]))
        self._infer = tf.function(infer)

    # ---- transport helpers -----------------------------------------------------
    def _post_recvs(self, sizes: Sequence[int], tensors: list[int], peer_of, tag_offset: int):
        """Pre-post receives for every micro-batch: {(m, t, peer): (buffer, request)}."""
        info = self.plan.graph.tensors
        posted = {}
        for m, n in enumerate(sizes):
            for t in tensors:
                for peer in peer_of(t):
                    buf = aligned_empty((n,) + tuple(info[t].shape), np_dtype(info[t].dtype))
                    posted[(m, t, peer)] = (buf, self.net.irecv(buf, peer, self.tag[t] + tag_offset))
        return posted

    def _take(self, posted, m: int, t: int, peer: int, what: str) -> np.ndarray:
        buf, req = posted.pop((m, t, peer))
        t0 = time.perf_counter()
        self.net.wait([req], what, peer)
        self.timers["wait"] += time.perf_counter() - t0
        return buf

    def _send(self, pending: list, value, dest: int, tag: int):
        array = to_numpy(value) if hasattr(value, "numpy") else value
        pending.append((array, self.net.isend(array, dest, tag)))

    def _send_activations(self, pending: list, sends) -> None:
        """Start sending a forward's boundary outputs to every stage that consumes them."""
        for t, value in zip(self.send_ids, sends):
            for d in self.dests[t]:
                self._send(pending, value, d, self.tag[t])

    @staticmethod
    def _reg_scale(norm: StepNorm, mb: MicroBatch):
        return tf.constant([norm.reg_scale, mb.size / norm.count], tf.float32)

    def _inputs(self, posted, m: int, mb: MicroBatch):
        recv_vals = [to_tensor(self._take(posted, m, t, self.src[t], f"activations of micro-batch {m}")) for t in self.stage.recv]
        return (
            recv_vals,
            [tf.convert_to_tensor(x) for x in mb.inputs],
            [tf.convert_to_tensor(y) for y in mb.targets],
            [None if w is None else tf.convert_to_tensor(w) for w in mb.weights],
        )

    # ---- a training step -------------------------------------------------------
    def train_step(self, micro: list[MicroBatch], norm: StepNorm) -> tuple[float, np.ndarray]:
        """Run the schedule over `micro`, all-reduce, apply. Returns this rank's share of
        the step's loss, and of each output's unweighted loss."""
        sizes = [mb.size for mb in micro]
        step = _Step(
            fwd_posted=self._post_recvs(sizes, self.stage.recv, lambda t: [self.src[t]], 0),
            bwd_posted=self._post_recvs(sizes, self.send_float, lambda t: self.dests[t], 1),
            divisors=tf.constant(norm.divisors, tf.float32),
            parts=np.zeros(len(self.plan.graph.output_names)),
        )
        for op, m in schedule(self.schedule_kind, self.plan.num_partitions, self.grid.stage, len(micro)):
            if op == FORWARD:
                with phase(f"{'forward and backward' if self.fused else 'forward'} (micro-batch {m})"):
                    self._forward_op(step, m, micro[m], norm)
            else:
                with phase(f"backward (micro-batch {m})"):
                    self._backward_op(step, m)
        with phase("sends to neighbouring stages"):
            self.net.wait([r for _, r in step.pending], "sends to neighbouring stages")
        if not self.variables and not self.loss_scaled:
            return step.loss, step.parts
        if self.grid.data.Get_size() == 1 and not self.loss_scaled:
            with phase("optimizer"):
                self._apply_accumulated()
            return step.loss, step.parts
        with phase("allreduce"):
            t0 = time.perf_counter()
            flat = to_numpy(self._flat_grads())
            if self._summed is None or self._summed.shape != flat.shape:
                self._summed = aligned_empty(flat.shape, flat.dtype)
            summed = self._summed  # reused: the optimizer step below is done with it on return
            self.net.allreduce_sum(self.grid.data, flat, summed, "gradient allreduce")
            self.timers["allreduce"] += time.perf_counter() - t0
        if self.loss_scaled:
            # Every stage must skip an overflowing step together (and lower the scale
            # alike): agree on finiteness, and hand non-finite gradients to all optimizers.
            finite = np.array([float(np.isfinite(summed).all())])
            self.net.allreduce_sum(self.grid.world, finite.copy(), finite, "loss-scale agreement")
            if finite[0] < self.grid.world.Get_size():
                summed[:] = np.nan
        if self.variables:
            with phase("optimizer"):
                self._apply(to_tensor(summed))
        return step.loss, step.parts

    def _forward_op(self, step: _Step, m: int, mb: MicroBatch, norm: StepNorm) -> None:
        args = self._inputs(step.fwd_posted, m, mb)
        t0 = time.perf_counter()
        if self.fused:
            sends, in_grads, loss, per_output = self._fused_step(*args, step.divisors, self._reg_scale(norm, mb))
            step.stash[m] = in_grads
        else:
            tape = tf.GradientTape()
            with tape:
                float_in = [v for t, v in zip(self.stage.recv, args[0]) if t in self.recv_float]
                tape.watch(float_in)
                sends, loss, scaled, per_output = self._train_forward(*args, step.divisors, self._reg_scale(norm, mb))
            step.stash[m] = (tape, float_in, scaled, [s for t, s in zip(self.send_ids, sends) if t in self.send_float])
        self.timers["compute"] += time.perf_counter() - t0
        step.loss += float(loss)
        step.parts[self.stage.model_outputs] += [float(p) for p in per_output]
        self._send_activations(step.pending, sends)

    def _backward_op(self, step: _Step, m: int) -> None:
        if self.fused:
            in_grads = step.stash.pop(m)  # computed with the forward
        else:
            tape, float_in, loss, float_out = step.stash.pop(m)
            out_grads = []
            for t in self.send_float:
                pieces = [self._take(step.bwd_posted, m, t, d, f"gradients of micro-batch {m}") for d in self.dests[t]]
                out_grads.append(to_tensor(pieces[0]) if len(pieces) == 1 else tf.convert_to_tensor(np.sum(pieces, axis=0)))
            t0 = time.perf_counter()
            grads = tape.gradient(
                [loss] + float_out,
                self.variables + float_in,
                output_gradients=[tf.ones_like(loss)] + out_grads,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            self._accumulate(grads[: len(self.variables)])
            in_grads = grads[len(self.variables) :]
            self.timers["compute"] += time.perf_counter() - t0
        for t, g in zip(self.recv_float, in_grads):
            self._send(step.pending, g, self.src[t], self.tag[t] + 1)

    # ---- forward only ----------------------------------------------------------
    def infer(self, micro: list[MicroBatch], norm: StepNorm) -> tuple[float, np.ndarray, list[list[Any]]]:
        """Forward passes for evaluate/predict: (loss share, per-output shares, outputs per micro-batch)."""
        posted = self._post_recvs([mb.size for mb in micro], self.stage.recv, lambda t: [self.src[t]], 0)
        pending: list = []
        divisors = tf.constant(norm.divisors, tf.float32)
        loss_total, parts, outputs = 0.0, np.zeros(len(self.plan.graph.output_names)), []
        with phase("forward"):
            for m, mb in enumerate(micro):
                sends, loss, per_output, preds = self._infer(*self._inputs(posted, m, mb), divisors, self._reg_scale(norm, mb))
                loss_total += float(loss)
                parts[self.stage.model_outputs] += [float(p) for p in per_output]
                outputs.append(preds)
                self._send_activations(pending, sends)
            self.net.wait([r for _, r in pending], "sends to neighbouring stages")
        return loss_total, parts, outputs
