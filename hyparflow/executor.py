"""The executor: walks a rank's schedule for one step, pre-posts every receive, feeds
its stages (its chunks: several under an interleaved schedule), ships their activations
forward and their input gradients back (those as the compiled backward hands them over,
before it computes the variables' gradients), then hands the accumulated gradients to the
reducer and the optimizer. Each edge of the plan (a tensor and a stage it goes to) has its
own pair of tags, so that two chunks of one rank never take each other's messages.

`timers` accumulates seconds of compute, of waiting on peers, and of gradient reduction,
and the process CPU seconds spent computing (`compute_cpu`: below `compute` when other
processes took this rank's core); `stage_compute`, the compute seconds of each of its stages;
`timeline`, when a `hyparflow.timeline.Timeline` records, receives each step, compute,
send, allreduce and optimizer event (the transport records the waits).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from hyparflow.errors import ConfigError
from hyparflow.failures import phase
from hyparflow.graph import np_dtype
from hyparflow.reducer import Reducer
from hyparflow.schedule import BACKWARD, FORWARD, schedule
from hyparflow.stage import MicroBatch, StageCompute, StepNorm
from hyparflow.timeline import Timeline
from hyparflow.transport import Transport, aligned_empty, to_numpy, to_tensor

_COMPUTE_NAMES = {"forward": "forward", "backward": "backward", "fused": "forward+backward"}  # timeline event names


def _clocks() -> tuple[float, float]:
    """(wall, process CPU) seconds now."""
    return time.perf_counter(), time.process_time()


@dataclass
class _Step:
    """Bookkeeping of one step on one stage."""

    fwd_posted: dict
    bwd_posted: dict
    divisors: Any
    parts: np.ndarray
    hand_over: tuple[int, int]  # the (chunk, micro-batch) whose backward is the step's last, when it reduces
    update: bool  # the backward runs the optimizer (`StageCompute.updates_in_backward`)
    loss: float = 0.0
    pending: list = field(default_factory=list)  # (buffer, request) of sends in flight
    stash: dict = field(default_factory=dict)  # (chunk, micro-batch) -> what its backward needs


class Executor:
    def __init__(self, compute: StageCompute, transport: Transport, schedule_kind: str):
        self.compute, self.transport, self.schedule_kind = compute, transport, schedule_kind
        if transport.grid is None:
            raise RuntimeError("the executor needs the session's grid: form it first")
        self.grid = transport.grid
        self.reducer = Reducer(transport, compute.loss_scaled, compute.variables, compute.plan.tied)
        compute.reducer = self.reducer
        edges = [(t, d) for st in compute.plan.stages for t, d in st.send]
        self.tag = {edge: 2 * i for i, edge in enumerate(edges)}  # +1: the edge's gradient
        self.at = self.grid.position  # a stage's rank in this replica's pipeline
        held = compute.plan.held(compute.stages)
        # Per chunk: where its model inputs and outputs sit in a micro-batch's (the rank's).
        self.picks = [
            ([held.data_inputs.index(i) for i in ch.stage.data_inputs],
             [held.model_outputs.index(o) for o in ch.stage.model_outputs])
            for ch in compute.chunks
        ]  # fmt: skip
        self.timers = {"compute": 0.0, "compute_cpu": 0.0, "wait": 0.0, "allreduce": 0.0}
        self.stage_compute = {s: 0.0 for s in compute.stages}
        self.timeline: Timeline | None = None

    # ---- transfers ------------------------------------------------------------------
    def _post_recvs(self, sizes: Sequence[int], edges: Callable[[Any], list[tuple[int, int, int]]], offset: int):
        """Pre-post receives for every micro-batch of every chunk: {(chunk, m, t, peer
        stage): (buffer, request)}. `edges(chunk)` lists (tensor, peer stage, the stage the
        edge goes to); an edge's messages come in micro-batch order, as its receives are posted."""
        info = self.compute.plan.graph.tensors
        posted = {}
        for k, ch in enumerate(self.compute.chunks):
            for m, n in enumerate(sizes):
                for t, peer, dest in edges(ch):
                    buf = aligned_empty((n,) + tuple(info[t].shape), np_dtype(info[t].dtype))
                    request = self.transport.irecv(buf, self.at(peer), self.tag[(t, dest)] + offset)
                    posted[(k, m, t, peer)] = (buf, request)
        return posted

    def _take(self, posted: dict, key: tuple[int, int, int, int], what: str) -> np.ndarray:
        buf, req = posted.pop(key)
        t0 = time.perf_counter()
        self.transport.wait([req], what, stage=self.at(key[3]))
        self.timers["wait"] += time.perf_counter() - t0
        return buf

    def _post_activation_recvs(self, sizes: Sequence[int]) -> dict:
        return self._post_recvs(sizes, lambda ch: [(t, ch.src[t], ch.stage.index) for t in ch.stage.recv], 0)

    def _send(self, pending: list, value, dest: int, tag: int) -> None:
        timeline = self.timeline
        t0 = time.perf_counter() if timeline is not None else 0.0
        array = to_numpy(value) if hasattr(value, "numpy") else value
        pending.append((array, self.transport.isend(array, dest, tag)))
        if timeline is not None:
            timeline.add(f"send to rank {self.grid.ranks[self.grid.replica][dest]}", "send", t0)

    def _send_activations(self, pending: list, chunk: int, sends, size: int) -> None:
        """Send a chunk's micro-batch of `size` samples' boundary tensors, each as Keras's
        symbolic shape and dtype say (the receiver's buffer is made by them)."""
        info, ch = self.compute.plan.graph.tensors, self.compute.chunks[chunk]
        for t, value in zip(ch.send_ids, sends):
            if value.shape[0] != size:
                raise ConfigError(
                    f"'{info[t].name}' has {value.shape[0]} rows at run time for a micro-batch of {size} samples: "
                    "its first axis is not the batch's (a table made once for all samples, or an axis folded into "
                    "the batch's, as video models fold frames), so it cannot be split into micro-batches; choose "
                    "cuts (balance=[...]) that keep it inside a stage."
                )
            now, symbolic = (tuple(value.shape[1:]), value.dtype.name), (tuple(info[t].shape), info[t].dtype)
            if now != symbolic:
                raise ConfigError(
                    f"'{info[t].name}' has per-sample shape and dtype {now} at run time, but Keras's symbolic "
                    f"ones for it (its layer's compute_output_spec) are {symbolic}, and transfers between "
                    "stages are sized and typed by them; choose cuts that keep this tensor inside a stage "
                    "(balance=[...]), or fix the layer's compute_output_shape or dtype."
                )
            for d in ch.dests[t]:
                self._send(pending, value, self.at(d), self.tag[(t, d)])

    def _inputs(self, posted: dict, chunk: int, m: int, mb: MicroBatch) -> tuple:
        ch, (ins, outs) = self.compute.chunks[chunk], self.picks[chunk]
        what = f"activations of micro-batch {m}"
        recv_vals = [to_tensor(self._take(posted, (chunk, m, t, ch.src[t]), what)) for t in ch.stage.recv]
        convert = tf.convert_to_tensor
        weights = [None if (w := mb.weights[o]) is None else convert(w) for o in outs]
        return recv_vals, [convert(mb.inputs[i]) for i in ins], [convert(mb.targets[o]) for o in outs], weights

    @staticmethod
    def _reg_scale(norm: StepNorm, mb: MicroBatch):
        return tf.constant([norm.reg_scale, mb.size / norm.count], tf.float32)

    # ---- a training step --------------------------------------------------------------
    def train_step(self, micro: list[MicroBatch], norm: StepNorm, dry: bool = False) -> tuple[float, np.ndarray]:
        """Run the schedule over `micro`, reduce, apply. Returns this rank's share of the
        step's loss, and of each output's unweighted loss. A `dry` step only accumulates
        its gradients: no reduction, no update (`hyparflow.rebalance` times such steps)."""
        c, sizes = self.compute, [mb.size for mb in micro]
        update = not dry and c.updates_in_backward(len(micro))
        c.allocate(accumulators=not update, optimizer=not dry)
        c.rows.clear()
        self.reducer.begin()
        if self.timeline is not None:
            self.timeline.begin_step("train")
        ops = self._ops(len(micro))
        last = [(k, m) for op, k, m in ops if op == (FORWARD if c.chunks[k].fused else BACKWARD)][-1]
        step = _Step(
            fwd_posted=self._post_activation_recvs(sizes),
            bwd_posted=self._post_recvs(sizes, lambda ch: [(t, d, d) for t in ch.send_float for d in ch.dests[t]], 1),
            divisors=tf.constant(norm.divisors, tf.float32),
            parts=np.zeros(len(c.plan.graph.output_names)),
            hand_over=last if self.reducer.needed and not dry else (-1, -1),
            update=update,
        )
        c.outbox = lambda k, grads: self._send_input_gradients(step.pending, k, grads)
        for op, k, m in ops:
            if op == FORWARD:
                with phase(f"{'forward and backward' if c.chunks[k].fused else 'forward'} ({self._of(k, m)})"):
                    self._forward(step, k, m, micro[m], norm)
            else:
                with phase(f"backward ({self._of(k, m)})"):
                    self._backward(step, k, m)
        with phase("sends to neighbouring stages"):
            self.transport.wait([r for _, r in step.pending], "sends to neighbouring stages")
        if not update and not dry:
            self._update()
        if self.timeline is not None:
            self.timeline.end_step()
        return step.loss, step.parts

    def _ops(self, num_micro: int) -> list:
        g = self.grid
        return schedule(self.schedule_kind, g.num_partitions, g.stage, num_micro, len(self.compute.chunks))

    def _of(self, chunk: int, m: int) -> str:
        """'micro-batch 3', or with several chunks 'micro-batch 3 on stage 5'."""
        return f"micro-batch {m}" + (f" on stage {self.compute.stages[chunk]}" if len(self.compute.chunks) > 1 else "")

    def _update(self) -> None:
        c = self.compute
        if not c.variables and not c.loss_scaled and c.clip is None:
            return
        summed = None
        if self.reducer.needed:
            with phase("allreduce"):
                t0 = time.perf_counter()
                summed = self.reducer.finish()
                t1 = time.perf_counter()
                self.timers["allreduce"] += t1 - t0
                if self.timeline is not None:
                    self.timeline.add("gradient allreduce", "allreduce", t0, t1, {"bytes": summed.nbytes})
        rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if c.keep_rows:
            with phase("sparse gradients"):
                rows = self.reducer.gather_rows(c.rows)
        scale = 1.0
        if c.clip is not None:
            with phase("global gradient norm"):
                squares = 0.0
                if c.variables:
                    values = tuple((i, to_tensor(v)) for i, (v, _) in sorted(rows.items()))
                    found = c.acc_squares(values) if summed is None else c.flat_squares(to_tensor(summed), values)
                    squares = float(found)
                scale = self.reducer.clip_scale(squares, c.clip)
                if summed is not None:  # here, so every holder of a tied variable updates it alike
                    summed *= np.float32(scale)
            rows = {}  # Keras's global clip multiplies sparse gradients into dense ones
        if not c.variables:
            return
        with phase("optimizer"), self._span("optimizer", "optimizer"):
            sparse = tuple((i, to_tensor(v), to_tensor(k)) for i, (v, k) in sorted(rows.items()))
            if summed is None:
                c.apply_accumulated(scale, sparse)
            else:
                c.apply_flat(to_tensor(summed), sparse)

    def _span(self, name: str, cat: str):
        """The block recorded as one timeline event, when a timeline records."""
        return self.timeline.span(name, cat) if self.timeline is not None else contextlib.nullcontext()

    def _compute_done(self, cat: str, chunk: int, m: int, start: tuple[float, float]) -> None:
        """Count compute since `start` (`_clocks()`), and record it as the `cat` event of
        micro-batch `m` on `chunk`."""
        t1, cpu1 = _clocks()
        self.timers["compute"] += t1 - start[0]
        self.timers["compute_cpu"] += cpu1 - start[1]
        self.stage_compute[self.compute.stages[chunk]] += t1 - start[0]
        if self.timeline is not None:
            args = {"micro_batch": m, "stage": self.compute.stages[chunk]}
            name = f"{_COMPUTE_NAMES[cat]} {m}" + (f" @{args['stage']}" if len(self.compute.chunks) > 1 else "")
            self.timeline.add(name, cat, start[0], t1, args)

    def _forward(self, step: _Step, k: int, m: int, mb: MicroBatch, norm: StepNorm) -> None:
        c, fused = self.compute, self.compute.chunks[k].fused
        args = self._inputs(step.fwd_posted, k, m, mb)
        t0 = _clocks()
        last = (k, m) == step.hand_over
        if fused:
            sends, loss, per_output = c.forward_backward(
                *args, step.divisors, self._reg_scale(norm, mb), chunk=k, hand_over=last, update=step.update
            )
        else:
            sends, loss, per_output, step.stash[(k, m)] = c.forward(
                k, args, step.divisors, self._reg_scale(norm, mb), hand_over=last, update=step.update
            )
        self._compute_done("fused" if fused else "forward", k, m, t0)
        step.loss += float(loss)
        step.parts[c.chunks[k].stage.model_outputs] += [float(p) for p in per_output]
        self._send_activations(step.pending, k, sends, mb.size)

    def _backward(self, step: _Step, k: int, m: int) -> None:
        ch = self.compute.chunks[k]
        if ch.fused:
            return  # it ran with the forward
        out_grads = []
        for t in ch.send_float:
            what = f"gradients of micro-batch {m}"
            pieces = [self._take(step.bwd_posted, (k, m, t, d), what) for d in ch.dests[t]]
            out_grads.append(to_tensor(pieces[0]) if len(pieces) == 1 else tf.convert_to_tensor(np.sum(pieces, axis=0)))
        t0 = _clocks()
        self.compute.backward(step.stash.pop((k, m)), out_grads)
        self._compute_done("backward", k, m, t0)

    def _send_input_gradients(self, pending: list, chunk: int, grads: list[np.ndarray]) -> None:
        """Send a chunk's input gradients to the stages they came from (`StageCompute.outbox`)."""
        ch = self.compute.chunks[chunk]
        for t, g in zip(ch.recv_float, grads):
            self._send(pending, g, self.at(ch.src[t]), self.tag[(t, ch.stage.index)] + 1)

    # ---- forward only -------------------------------------------------------------------
    def infer(self, micro: list[MicroBatch], norm: StepNorm | None) -> tuple[float, np.ndarray, list[list[Any]]]:
        """Forward passes for evaluate (with `norm`: loss and metrics) or predict (without):
        (loss share, per-output shares, this stage's model outputs per micro-batch)."""
        c = self.compute
        posted = self._post_activation_recvs([mb.size for mb in micro])
        pending: list = []
        loss_total, parts = 0.0, np.zeros(len(c.plan.graph.output_names))
        if self.timeline is not None:
            self.timeline.begin_step("test" if norm is not None else "predict")
        with phase("forward"):
            outputs: list[list[Any]] = [[] for _ in micro]
            for op, k, m in self._ops(len(micro)):
                if op != FORWARD:
                    continue
                mb = micro[m]
                recv_vals, data_vals, ys, sws = self._inputs(posted, k, m, mb)
                t0 = _clocks()
                if norm is None:
                    sends, preds = c.predict(recv_vals, data_vals, chunk=k)
                else:
                    divisors = tf.constant(norm.divisors, tf.float32)
                    sends, loss, per_output, preds = c.infer(
                        recv_vals, data_vals, ys, sws, divisors, self._reg_scale(norm, mb), chunk=k
                    )
                    loss_total += float(loss)
                    parts[c.chunks[k].stage.model_outputs] += [float(p) for p in per_output]
                self._compute_done("forward", k, m, t0)
                outputs[m] += preds
                self._send_activations(pending, k, sends, mb.size)
            self.transport.wait([r for _, r in pending], "sends to neighbouring stages")
        if self.timeline is not None:
            self.timeline.end_step()
        return loss_total, parts, outputs
