"""A rank's stage compute: forward and backward of one micro-batch, gradient
accumulation and the optimizer step, as compiled TensorFlow functions.

A rank holds one stage of the plan, or several under an interleaved schedule (its chunks,
one set of accumulators and one optimizer over them all). A chunk declares what it
receives (`recv`, from `src[t]`) and sends (`send_ids`, to `dests[t]`); it never
communicates itself: the executor feeds it and ships its results.
A stage that sends no float tensor needs no gradient from later stages, so its forward
and backward run fused in one function; others keep the forward's tape until the
backward's output gradients arrive, or, with `recompute`, keep only the forward's inputs
and run the forward again under a tape in the backward (activation checkpointing, as
torchgpipe and DeepSpeed do): memory for time. Either way the variables' gradients are
added into the accumulators inside the compiled backward, so a few layers' gradients are
alive at a time, never the whole stage's beside its accumulators. The step's last
backward also hands each bucket of finished accumulators to the reducer as it completes
(`Reducer.post`), so the replicas' allreduce overlaps the rest of the backward. Every
backward hands its input gradients to the executor (`outbox`, which sends them) as soon as
they exist, and only then computes the variables' gradients, which nothing upstream waits
for: the stage before starts its own backward a weight-gradient's time sooner, as
zero-bubble pipelines split a backward (Qi et al. 2024), in one compiled call. A step with
one micro-batch and nothing to reduce needs no accumulators: a backward that is one compiled
function (fused or recomputed) then runs the optimizer itself (`updates_in_backward`).

A recomputed forward must draw what the original drew, so the stage's non-trainable
state (seed generators, BatchNorm statistics) is put back to where it stood before the
original forward, and afterwards back to where the later forwards left it; metrics are
updated by the original forward only.

An embedding's gradient is sparse: one row per token occurrence. Keras hands those rows to
the optimizer, and Adam's second moment, for one, squares each row, which their sum cannot
reproduce. Where the optimizer's update (or its clipping) depends on the rows, the backward
also keeps them on the host (`rows`), and the step hands the optimizer every row of the
global batch as Keras would (`Reducer.gather_rows`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hyparflow.errors import ConfigError
from hyparflow.keras_compat import (
    clipped_outside,
    global_clipnorm,
    inner_optimizer,
    one_update_at_a_time,
    optimizer_variables_for,
    run_after,
    sparse_rows_matter,
)
from hyparflow.objective import Objective
from hyparflow.partition import Plan, Stage


@dataclass
class MicroBatch:
    """What one stage reads from the data for one micro-batch (NumPy arrays)."""

    size: int
    inputs: list[np.ndarray]  # the stage's model inputs, in stage.data_inputs order
    targets: list[np.ndarray]  # for the stage's model outputs, in stage.model_outputs order
    weights: list[np.ndarray | None]  # sample weights, likewise (None: unweighted)


@dataclass
class _Inputs:
    """The stash of a forward to be recomputed: its arguments and the state it started from."""

    args: tuple
    state: list[Any]
    hand_over: bool
    update: bool
    chunk: int


@dataclass
class _Chunk:
    """One of the plan's stages this rank holds (one, or several under an interleaved
    schedule): what it receives and sends, and where its variables sit among the rank's."""

    stage: Stage
    src: dict[int, int]  # received tensor -> the stage it comes from
    send_ids: list[int]
    dests: dict[int, list[int]]  # sent tensor -> the stages it goes to
    recv_float: list[int]
    send_float: list[int]
    variables: list[Any]  # trainable
    index: list[int]  # each variable's position in `StageCompute.variables`
    state: list[Any]  # non-trainable variables a training forward may change
    none: list[bool] = field(default_factory=list)  # per variable: its gradient came as None (set by each trace)

    @classmethod
    def of(cls, plan: Plan, index: int, held: list[Any]) -> _Chunk:
        st, tensors = plan.stages[index], plan.graph.tensors
        send_ids = list(dict.fromkeys(t for t, _ in st.send))
        variables = st.trainable_variables
        at = {id(v): i for i, v in enumerate(held)}
        return cls(
            stage=st,
            src={t: plan.stage_of_call[tensors[t].producer] for t in st.recv},
            send_ids=send_ids,
            dests={t: [d for u, d in st.send if u == t] for t in send_ids},
            recv_float=[t for t in st.recv if tensors[t].is_float],
            send_float=[t for t in send_ids if tensors[t].is_float],
            variables=variables,
            index=[at[id(v)] for v in variables],
            # Variables created non-trainable (seed states, BatchNorm statistics). A frozen
            # layer's weights stay trainable variables and are left out.
            state=[v for v in st.variables if not v.trainable],
        )

    @property
    def fused(self) -> bool:
        """It sends no float tensor, so needs no gradient from later stages: its forward and
        backward run as one function."""
        return not self.send_float


@dataclass
class StepNorm:
    """Normalisers that make micro-batch losses add up to the global-batch loss."""

    divisors: np.ndarray  # per model output: Objective.divisors of the global batch
    reg_scale: float  # 1 / micro-batches run by all replicas of a stage (weight regularizers count once)
    count: int  # samples in the global batch: call-time losses (activity regularizers) are per-sample means


_STAGE_GRADIENT = "HyparflowAccumulatingStage"


@tf.RegisterGradient(_STAGE_GRADIENT)
def _stage_gradient(op, d_scaled, *d_rest):
    """The gradient `StageCompute._accumulating_forward` left in the op's graph."""
    grad = dict(op.graph.get_collection(_STAGE_GRADIENT))[op.name]
    return grad(d_scaled, *d_rest)


def _post(owner: weakref.ref, k: int, flat: np.ndarray) -> np.int32:
    """Bucket `k` of the step's gradients, from inside the compiled backward, to the reducer."""
    me = owner()
    assert me is not None, "a stage's backward ran after the stage was freed"
    me.reducer.post(k, flat)
    return np.int32(k)


def _keep_rows(owner: weakref.ref, i: int, values: np.ndarray, indices: np.ndarray) -> np.int32:
    """A backward's sparse gradient of variable `i`, from inside the compiled backward, to the host."""
    me = owner()
    assert me is not None, "a stage's backward ran after the stage was freed"
    me.rows.setdefault(i, []).append((values, indices))
    return np.int32(i)


def _hand_back(owner: weakref.ref, chunk: int, *grads: np.ndarray) -> np.int32:
    """A backward's input gradients, from inside the compiled backward, to the executor."""
    me = owner()
    assert me is not None, "a stage's backward ran after the stage was freed"
    me.outbox(chunk, [np.array(g) for g in grads])  # copies: TensorFlow may reuse the memory
    return np.int32(0)


def _after_input_gradients(ops: list[Any], input_grads: list[Any], gate: Any) -> None:
    """Make the backward's `ops` that the input gradients do not need (the variables'
    gradients) wait for `gate`, the op that hands the input gradients over. Not those a
    stateful op or a variable's reader needs (a custom gradient's print or assert):
    tf.function runs those in the order they were made, so the gate, made last, waits for them."""
    made = {op for op in ops if op.type != "Placeholder"}  # not the values a backward captures
    # Through the forward's ops too: a while loop's gradient gives the forward loop new inputs.
    rest = made - _ancestors([g.op for g in input_grads])
    free = rest - _ancestors(
        [op for op in rest if op.op_def.is_stateful or any(x.dtype == tf.resource for x in op.inputs)]
    )
    run_after(gate, [op for op in ops if op in free and not any(x.op in free for x in op.inputs)])


def _ancestors(ops: list[Any]) -> set[Any]:
    """`ops` and every op they depend on."""
    found: set[Any] = set()
    stack = list(ops)
    while stack:
        op = stack.pop()
        if op not in found:
            found.add(op)
            stack += [x.op for x in op.inputs] + list(op.control_inputs)
    return found


def _optimizer_for(optimizer, model, variables):
    """The model's optimizer if it is unbuilt or built for exactly `variables`; else (it was
    built for another layout by an earlier fit) a fresh one carrying its state over."""
    from hyparflow.checkpoint import optimizer_state, restore_optimizer_state

    if not getattr(optimizer, "built", False):
        return optimizer
    if {id(v) for v in optimizer_variables_for(optimizer)} == {id(v) for v in variables}:
        return optimizer
    fresh = optimizer.__class__.from_config(optimizer.get_config())
    restore_optimizer_state(fresh, model, variables, optimizer_state(optimizer, model))
    model.optimizer = fresh
    return fresh


class StageCompute:
    """The compiled pieces of a rank's `stages` of `plan` (see the module docstring): each
    stage's forward and backward (its chunk), and one set of accumulators and optimizer
    over the variables of them all (a layer called on two of them counts once)."""

    def __init__(self, plan: Plan, stages: Sequence[int], objective: Objective, optimizer):
        self.plan, self.objective = plan, objective
        self.stages = tuple(stages)
        self.variables = list({id(v): v for s in stages for v in plan.stages[s].trainable_variables}.values())
        self.chunks = [_Chunk.of(plan, s, self.variables) for s in stages]
        self.optimizer = _optimizer_for(optimizer, plan.graph.model, self.variables)
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # global_clipnorm is applied outside the optimizer: the executor sums the stages'
        # squares (a tied variable counts on its first) and scales the gradients.
        self.clip = global_clipnorm(self.optimizer)
        if self.clip is not None and getattr(inner_optimizer(self.optimizer), "gradient_accumulation_steps", None):
            if len(plan.stages) > 1:
                raise ConfigError(
                    "global_clipnorm with the optimizer's gradient_accumulation_steps is not supported across "
                    "stages; use num_microbatches, or clipnorm (per variable)."
                )
            self.clip = None  # the optimizer clips its averaged gradients at its update steps
        first = {id(v): min(holders) for v, holders in plan.tied}
        self.counted = [first.get(id(v), self.stages[0]) in self.stages for v in self.variables]
        self.tied = {i for i, v in enumerate(self.variables) if id(v) in first}
        self.keep_rows = bool(self.variables) and self.optimizer is not None and sparse_rows_matter(self.optimizer)
        self.rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # the step's sparse gradients
        # Set by each fit call; meaningless for a fused chunk: its backward follows its forward at once.
        self.recompute = False
        self.acc: list[Any] = []  # made by `allocate`
        self.reducer: Any = None  # the executor's `Reducer`
        self.outbox: Any = None  # the executor's sender of a chunk's input gradients (chunk, NumPy arrays)
        self._build()

    def updates_in_backward(self, num_microbatches: int) -> bool:
        """Whether a step of `num_microbatches` runs the optimizer inside its compiled
        backward, each variable's update as soon as its gradient exists, as Keras's
        train_step does, so that neither accumulators nor the whole stage's gradients are
        ever held: one micro-batch, nothing to sum or agree on with other ranks, and a
        backward that is one compiled function (fused, or recomputed)."""
        return (
            num_microbatches == 1
            and len(self.chunks) == 1
            and bool(self.variables)
            and self.clip is None
            and not self.reducer.needed
            and (self.chunks[0].fused or self.recompute)
        )

    @property
    def state(self) -> list[Any]:
        """What a training forward of any chunk may change (`_Chunk.state`)."""
        return list({id(v): v for ch in self.chunks for v in ch.state}.values())

    @property
    def unused(self) -> list[bool]:
        """Per variable: no chunk got a gradient for it, so it is not updated, as Keras's
        optimizer skips it (a tied one takes the other holders' gradient; a rank with no
        gradient at all applies zeros). Known once every chunk's backward is traced."""
        none = [True] * len(self.variables)
        for ch in self.chunks:
            for i, n in zip(ch.index, ch.none or [False] * len(ch.index)):
                none[i] = none[i] and n
        unused = [n and i not in self.tied for i, n in enumerate(none)]
        return [False] * len(unused) if all(unused) else unused

    def allocate(self, accumulators: bool, optimizer: bool = True) -> None:
        """Make the optimizer's slots (unless not `optimizer`: steps that update nothing),
        then (`accumulators`) the gradient accumulators, before the first training step
        that needs them: by then a rank holds only its stage's weights (rank 0 releases the
        others once it has sent them), and slots made first find room for their making."""
        if optimizer and self.optimizer is not None and not getattr(self.optimizer, "built", False):
            self.optimizer.build(self.variables)
        if accumulators and len(self.acc) != len(self.variables):
            self.acc = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in self.variables]

    def _run(self, recv_vals, data_vals, ys, sws, divisors, reg_scale, training: bool, *, chunk=0, metrics=True):
        st, obj = self.chunks[chunk].stage, self.objective
        feeds = dict(zip(st.recv, recv_vals))
        feeds.update(self._model_inputs(st, data_vals))
        out = st.forward(feeds, training=training)
        preds = [out[t] for t in st.output_tensors]
        loss, per_output = obj.stage_loss(st.model_outputs, ys, preds, sws, divisors)
        # reg_scale[0]: weight regularizers, once per step; reg_scale[1]: this micro-batch's
        # share of the global batch, for per-sample-mean losses added in call()
        reg = obj.regularization(st.weight_losses) * reg_scale[0] + obj.regularization(st.call_losses) * reg_scale[1]
        if metrics:
            obj.update_metrics(st.model_outputs, ys, preds, sws)
        return [out[t] for t in self.chunks[chunk].send_ids], loss + reg, per_output, preds

    def _model_inputs(self, st: Stage, data_vals) -> dict[int, Any]:
        """The stage's model inputs (model input i is tensor i), cast to their `keras.Input`
        dtypes as Keras's functional call casts them (NumPy's int64 into an int32 input): an
        input may cross to a later stage as it came, and transfers are typed symbolically."""
        tensors = self.plan.graph.tensors
        return {t: tf.cast(v, tensors[t].dtype) for t, v in zip(st.data_inputs, data_vals)}

    def _train_forward(self, recv_vals, data_vals, ys, sws, divisors, reg_scale, *, chunk=0, metrics=True):
        """Also returns the loss to differentiate, scaled as the optimizer asks
        (LossScaleOptimizer under mixed_float16), so every stage's gradients scale alike."""
        sends, loss, per_output, _ = self._run(
            recv_vals, data_vals, ys, sws, divisors, reg_scale, training=True, chunk=chunk, metrics=metrics
        )
        scaled = self.optimizer.scale_loss(loss) if hasattr(self.optimizer, "scale_loss") else loss
        return sends, loss, scaled, per_output

    def _taped_forward(self, recv_vals, rest, chunk: int, metrics: bool = True):
        """The training forward under a tape that watches the float inputs:
        (tape, float inputs, sends, loss, scaled loss, per-output losses)."""
        float_in = self._float_inputs(chunk, recv_vals)
        with tf.GradientTape() as tape:
            tape.watch(float_in)
            sends, loss, scaled, per_output = self._train_forward(recv_vals, *rest, chunk=chunk, metrics=metrics)
        return tape, float_in, sends, loss, scaled, per_output

    def _float_inputs(self, chunk: int, recv_vals) -> list[Any]:
        ch = self.chunks[chunk]
        return [v for t, v in zip(ch.stage.recv, recv_vals) if t in ch.recv_float]

    def _accumulating_forward(self, anchor, recv_vals, *rest, chunk: int = 0, hand_over: bool = False):
        """`_train_forward` whose gradient adds the variables' gradients into the accumulators
        within the compiled backward and returns the float inputs' gradients only. The
        backward runs when a gradient is asked of `anchor`, a scalar input every stage has.

        Built as `tf.custom_gradient` builds one, less its flaw: it registers a gradient
        function per trace for good, holding the variables it read (a model's weights would
        never be freed). Here one function is registered, and each trace's gradient is kept
        in the trace's graph, so it goes with the stage's compiled functions."""
        tape, float_in, sends, loss, scaled, per_output = self._taped_forward(recv_vals, rest, chunk)
        results = tf.nest.flatten((scaled, sends, loss, per_output))
        graph = tf.compat.v1.get_default_graph()
        with graph.gradient_override_map({"IdentityN": _STAGE_GRADIENT}):
            passed = tf.identity_n(results + [anchor] + float_in)
        owner = weakref.ref(self)

        @tf.autograph.experimental.do_not_convert
        def grad(d_scaled, *d_rest):
            me = owner()
            assert me is not None, "a stage's backward was built after the stage was freed"
            ch = me.chunks[chunk]
            d_sends = dict(zip(ch.send_ids, d_rest))
            out_grads = [d_sends[t] if d_sends[t] is not None else tf.zeros_like(s)
                         for t, s in zip(ch.send_ids, sends) if t in ch.send_float]  # fmt: skip
            grads = me._gradients(chunk, tape, float_in, d_scaled, scaled, sends, out_grads)
            with tf.control_dependencies(me._accumulate_now(chunk, grads[: len(ch.variables)], hand_over)):
                in_grads = [tf.zeros_like(anchor)] + [tf.identity(g) for g in grads[len(ch.variables) :]]
            return [None] * len(results) + in_grads

        graph.add_to_collection(_STAGE_GRADIENT, (passed[0].op.name, grad))
        out = tf.nest.pack_sequence_as((scaled, sends, loss, per_output), passed[: len(results)])
        return out[1], out[2], out[0], out[3]

    def _gradients(self, chunk: int, tape, float_in, d_scaled, scaled, sends, out_grads) -> list[Any]:
        """Gradients of the chunk's variables (None for one its outputs do not depend on, as
        Keras leaves it), then of the float inputs (zeros there), given the float sends'
        gradients. The float inputs' are handed to `outbox` before the variables' are computed."""
        ch = self.chunks[chunk]
        float_out = [s for t, s in zip(ch.send_ids, sends) if t in ch.send_float]
        targets, seeds = [scaled] + float_out, [d_scaled] + list(out_grads)
        graph = tf.compat.v1.get_default_graph()
        first = len(graph.get_operations())
        grads = tape.gradient(targets, ch.variables + float_in, output_gradients=seeds)
        n = len(ch.variables)
        in_grads = [tf.zeros_like(x) if g is None else g for g, x in zip(grads[n:], float_in)]
        if not in_grads:
            return grads[:n]
        made = graph.get_operations()[first:]
        gate = tf.numpy_function(functools.partial(_hand_back, weakref.ref(self), chunk), in_grads, tf.int32)
        _after_input_gradients(made, in_grads, gate.op)
        with tf.control_dependencies([gate]):  # so that no backward leaves it out
            return grads[:n] + [tf.identity(g) for g in in_grads]

    def _fused(self, recv_vals, *rest, chunk: int = 0, hand_over: bool = False, update: bool = False):
        tape, float_in, sends, loss, scaled, per_output = self._taped_forward(recv_vals, rest, chunk)
        grads = self._gradients(chunk, tape, float_in, tf.ones_like(scaled), scaled, [], [])
        self._take(chunk, grads[: len(self.chunks[chunk].variables)], hand_over, update)
        return sends, loss, per_output  # the input gradients left through `outbox`

    def _forward_from(self, *args, chunk: int = 0):
        """The training forward, untaped, and the state it started from (for `_recomputed`)."""
        before = [tf.identity(v) for v in self.chunks[chunk].state]
        sends, loss, _, per_output = self._train_forward(*args, chunk=chunk)
        return sends, loss, per_output, before

    def _recomputed(
        self, recv_vals, data_vals, ys, sws, divisors, reg_scale, before, out_grads, chunk=0, hand_over=False,
        update=False,
    ):  # fmt: skip
        """Run the forward again from state `before`, differentiate and accumulate (or
        update); leave the state as it was found. Returns the float inputs' gradients."""
        state = self.chunks[chunk].state
        now = [tf.identity(v) for v in state]
        for v, value in zip(state, before):
            v.assign(value)
        rest = (data_vals, ys, sws, divisors, reg_scale)
        tape, float_in, sends, _, scaled, _ = self._taped_forward(recv_vals, rest, chunk, metrics=False)
        grads = self._gradients(chunk, tape, float_in, tf.ones_like(scaled), scaled, sends, out_grads)
        for v, value in zip(state, now):
            v.assign(value)
        n = len(self.chunks[chunk].variables)
        self._take(chunk, grads[:n], hand_over, update)
        # The loss too, for an output: TensorFlow runs a function that has none (a first
        # stage's: no input gradients) in an order that keeps every gradient alive at once.
        return grads[n:], scaled

    def _take(self, chunk: int, grads, hand_over: bool, update: bool) -> None:
        """Hand a compiled backward's variable gradients on: to the optimizer (`update`, see
        `updates_in_backward`: one chunk; None for unused variables, which Keras's optimizer
        skips, or zeros for all if all are, as its `apply` refuses that), else to the accumulators."""
        if not update:
            self._accumulate_now(chunk, grads, hand_over)
            return
        if all(g is None for g in grads):
            grads = [tf.zeros_like(v) for v in self.variables]
        self.optimizer.apply(grads, self.variables)

    def _accumulate_now(self, chunk: int, grads, hand_over: bool = False) -> list[Any]:
        """Add a chunk's `grads` into the accumulators; with `hand_over` (the step's last
        backward), then pass each bucket to the reducer once its accumulators are final, in
        bucket order (the other chunks' backwards ran before it)."""
        ch = self.chunks[chunk]
        ch.none = [g is None for g in grads]
        done: list[Any] = [tf.no_op() for _ in self.acc]
        for i, g in zip(ch.index, grads):
            if g is not None:
                done[i] = self.acc[i].assign_add(tf.cast(tf.convert_to_tensor(g), self.acc[i].dtype))
        if self.keep_rows:
            owner = weakref.ref(self)
            for i, g in zip(ch.index, grads):
                if isinstance(g, tf.IndexedSlices):
                    keep = functools.partial(_keep_rows, owner, i)
                    done.append(tf.numpy_function(keep, [g.values, tf.cast(g.indices, tf.int64)], tf.int32))
        if not hand_over:
            return done
        owner = weakref.ref(self)
        posted: list[Any] = []
        for k, (a, b) in enumerate(self.reducer.buckets):
            with tf.control_dependencies(done[a:b] + posted):
                parts = [tf.cast(acc.read_value(), self.reducer.dtype) for acc in self.acc[a:b]]
                flat = tf.concat([tf.reshape(p, [-1]) for p in parts], 0)
            post = functools.partial(_post, owner, k)
            posted = [tf.numpy_function(post, [flat], tf.int32, name=f"hand_over_bucket_{k}")]
        return done + posted

    def _apply_now(self, grads, zero, scale=None, rows=()) -> None:
        """Update the variables one after another, then zero the accumulators one after
        another, from `zero`, a runtime scalar: zeros the compiler could see would be
        folded into constants kept as large as the accumulators. `rows`: (i, values,
        indices) of the variables whose gradients the optimizer takes as sparse rows. With
        `clip`, the gradients come clipped by the whole model's norm, or are multiplied
        here by `scale` (that norm's clip factor), and the optimizer does not clip them again."""
        grads = [None if unused else tf.cast(g, v.dtype) for g, v, unused in zip(grads, self.variables, self.unused)]
        clipping: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.clip is not None:
            if scale is not None:
                grads = [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]
            clipping = clipped_outside(self.optimizer)
        for i, values, indices in rows:
            v = self.variables[i]
            grads[i] = tf.IndexedSlices(tf.cast(values, v.dtype), indices, tf.constant(list(v.shape), tf.int64))
        with one_update_at_a_time(self.optimizer), clipping:
            self.optimizer.apply(grads, self.variables)
        done = [tf.identity(v) for v in self.variables]  # read after their updates
        for a in self.acc:
            with tf.control_dependencies(done):
                done = [a.assign(tf.fill(tf.shape(a), tf.cast(zero, a.dtype)), read_value=False)]

    def _unflatten(self, flat) -> list[Any]:
        sizes = [int(np.prod(v.shape)) for v in self.variables]
        parts = tf.split(flat, sizes) if sizes else []
        return [tf.reshape(p, v.shape) for p, v in zip(parts, self.variables)]

    def _squares(self, grads, rows=()):
        """The sum of the squared gradients this stage counts, as the optimizer would see
        them (unscaled, under a LossScaleOptimizer): of their `rows` (i, values) where
        Keras's are sparse, as Keras's norm counts each token occurrence's row."""
        squares = [tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in grads]
        for i, values in rows:
            squares[i] = tf.reduce_sum(tf.square(tf.cast(values, tf.float32)))
        total = tf.add_n([tf.zeros(())] + [q for q, counted in zip(squares, self.counted) if counted])
        if self.loss_scaled:
            total /= tf.square(tf.cast(self.optimizer.dynamic_scale, tf.float32))
        return total

    def _build(self) -> None:
        self.train_forward = tf.function(self._accumulating_forward)
        self.forward_backward = tf.function(self._fused)
        self.forward_from = tf.function(self._forward_from)
        self.recomputed = tf.function(self._recomputed)
        apply_flat = tf.function(
            lambda flat, zero, rows: self._apply_now(self._unflatten(flat), zero, rows=rows), reduce_retracing=True
        )
        self.apply_flat = lambda flat, rows: apply_flat(flat, tf.zeros(()), rows)
        # Without replicas there is nothing to reduce: apply the accumulators in place.
        apply_accumulated = tf.function(
            lambda zero, scale, rows: self._apply_now([a.value() for a in self.acc], zero, scale, rows),
            reduce_retracing=True,
        )
        self.apply_accumulated = lambda scale, rows: apply_accumulated(
            tf.zeros(()), tf.constant(scale, tf.float32), rows
        )
        self.flat_squares = tf.function(
            lambda flat, rows: self._squares(self._unflatten(flat), rows), reduce_retracing=True
        )
        self.acc_squares = tf.function(
            lambda rows: self._squares([a.value() for a in self.acc], rows), reduce_retracing=True
        )
        self.infer = tf.function(functools.partial(self._run, training=False))
        self.predict = tf.function(self._predict)

    def _predict(self, recv_vals, data_vals, chunk: int = 0):
        """Forward only, no loss or metrics: (sends, model outputs)."""
        ch = self.chunks[chunk]
        feeds = dict(zip(ch.stage.recv, recv_vals))
        feeds.update(self._model_inputs(ch.stage, data_vals))
        out = ch.stage.forward(feeds, training=False)
        return [out[t] for t in ch.send_ids], [out[t] for t in ch.stage.output_tensors]

    def forward(self, chunk: int, args, divisors, reg_scale, hand_over: bool = False, update: bool = False):
        """A chunk's training forward: (sends, loss, per-output, stash for `backward`). The
        stash is the forward's tape, or with `recompute` its inputs and starting state. With
        `hand_over`, the stash's backward is the step's last (see `_accumulate_now`); with
        `update`, it runs the optimizer (recomputed only: see `updates_in_backward`)."""
        if self.recompute:
            sends, loss, per_output, before = self.forward_from(*args, divisors, reg_scale, chunk=chunk)
            return sends, loss, per_output, _Inputs((*args, divisors, reg_scale), before, hand_over, update, chunk)
        tape = tf.GradientTape()
        with tape:
            anchor = tf.zeros(())
            float_in = self._float_inputs(chunk, args[0])
            tape.watch([anchor] + float_in)
            sends, loss, scaled, per_output = self.train_forward(
                anchor, *args, divisors, reg_scale, chunk=chunk, hand_over=hand_over
            )
        return sends, loss, per_output, (tape, [anchor] + float_in, scaled, sends, chunk)

    def backward(self, stash, out_grads) -> None:
        """Accumulate the chunk's variables' gradients (or, stashed with `update`, apply
        them); the float inputs' gradients leave through `outbox`."""
        if isinstance(stash, _Inputs):
            self.recomputed(
                *stash.args, stash.state, out_grads, chunk=stash.chunk, hand_over=stash.hand_over, update=stash.update
            )
            return
        tape, sources, scaled, sends, chunk = stash
        ch = self.chunks[chunk]
        float_out = [s for t, s in zip(ch.send_ids, sends) if t in ch.send_float]
        tape.gradient([scaled] + float_out, sources, output_gradients=[tf.ones_like(scaled)] + list(out_grads))
