"""The model graph: a Keras functional model as a flat, topologically ordered list
of layer calls, with the per-call costs the partitioner balances.

Every walk here is iterative, so graphs of thousands of layers (ResNet-1001, the
5,000-layer models of HyPar-Flow) need no recursion-limit tricks.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hyparflow import keras_compat
from hyparflow.errors import ConfigError

COST_MODELS = ("time", "flops", "params")
# Above this many layer calls, "time" profiling costs more than it is worth.
TIME_PROFILE_MAX_CALLS = 100


@dataclass
class TensorInfo:
    """One edge of the graph: a symbolic tensor, its per-sample shape and dtype."""

    index: int
    ref: Any  # the KerasTensor
    shape: tuple[int | None, ...]  # without the batch dimension
    dtype: str
    producer: int  # index of the producing call, -1 for a model input
    model_input: int = -1  # position among model.inputs, or -1
    consumers: list[int] = field(default_factory=list)

    label: str = ""  # the producing layer's name (":k" for its k-th output), or the input's

    @property
    def name(self) -> str:
        return self.label or self.ref.name

    @property
    def is_float(self) -> bool:
        return "float" in self.dtype

    @property
    def bytes_per_sample(self) -> int:
        return int(np.prod([d or 1 for d in self.shape])) * np_dtype(self.dtype).itemsize


@dataclass
class LayerCall:
    """One call of one layer (a node of the Keras graph)."""

    index: int
    name: str  # the layer's name, suffixed with "#k" for its k-th call when shared
    node: Any
    layer: Any
    inputs: tuple[int, ...]  # tensor indices
    outputs: tuple[int, ...]
    param_bytes: int  # zero for the second and later calls of a shared layer
    act_bytes: int  # output bytes per sample
    flops: float  # per sample, estimated
    cost: float = 0.0  # what balancing uses; set by ModelGraph.set_costs


def np_dtype(dtype) -> np.dtype:
    """The NumPy dtype of a TensorFlow / Keras dtype (bfloat16 included, via ml_dtypes)."""
    import tensorflow as tf

    return np.dtype(tf.as_dtype(dtype).as_numpy_dtype)


def _functional(model):
    """The functional graph behind `model`, or a clear error if it has none."""
    import keras

    fn = keras_compat.functional_graph(model)
    if fn is not None:
        return fn
    if isinstance(model, keras.Sequential):
        raise ConfigError(
            f"Sequential model '{model.name}' is not built: give its first layer an "
            "input shape (keras.Input(shape=...)) or call model.build(input_shape) first."
        )
    raise ConfigError(
        f"Model '{model.name}' ({type(model).__name__}) is a subclassed model with no "
        "functional graph, so it cannot be split into stages. Use num_partitions=1 "
        "(pure data parallelism), or rewrite it with the functional API "
        "(keras.Input -> layers -> keras.Model(inputs, outputs))."
    )


def _flops(layer, call_inputs, call_outputs, param_count) -> float:
    """Per-sample FLOPs estimate: 2 x MACs for layers with a kernel, else element count."""
    out_elems = sum(int(np.prod([d or 1 for d in t.shape[1:]])) for t in call_outputs)
    kernel = getattr(layer, "kernel", None) if hasattr(layer, "weights") else None
    if kernel is not None and hasattr(kernel, "shape") and len(kernel.shape) >= 2:
        k = int(np.prod(kernel.shape))
        if type(layer).__name__.startswith("Depthwise"):
            return 2.0 * out_elems * int(np.prod(kernel.shape[:-2]))
        return 2.0 * k * out_elems / max(int(kernel.shape[-1]), 1)
    if param_count and hasattr(layer, "layers"):  # a nested model kept whole
        return 2.0 * param_count + out_elems
    return float(out_elems)


class ModelGraph:
    """Layer calls of a functional model in a topological order, with costs.

    The order is depth-first from the inputs: of the calls a call makes ready, the one
    closest to an output goes first (an auxiliary head stays next to the layer feeding
    it, a branch is finished before the next starts), while branches that start at a
    model input wait until the graph needs them (a late input is read late).
    """

    def __init__(self, model):
        self.model = model
        fn = _functional(model)
        self.functional = fn
        by_depth = keras_compat.nodes_by_depth(fn)
        nodes = [n for depth in sorted(by_depth, reverse=True) for n in by_depth[depth]]
        keras_rank = {id(n): i for i, n in enumerate(nodes)}
        nodes = [n for n in nodes if n.operation is not None and not n.is_input]

        self.tensors: list[TensorInfo] = []
        self._tensor_of: dict[int, int] = {}  # id(KerasTensor) -> index
        for i, t in enumerate(fn.inputs):
            self._add_tensor(t, producer=-1, model_input=i)

        # Kahn's algorithm, LIFO among ready nodes (depth-first), Keras order as tie-break.
        produced_by = {id(t): id(n) for n in nodes for t in n.outputs}
        by_id = {id(n): n for n in nodes}
        waiting = {}
        consumers_of: dict[int, list[int]] = {}
        for n in nodes:
            deps = {produced_by[id(t)] for t in n.input_tensors if id(t) in produced_by}
            waiting[id(n)] = len(deps)
            for d in deps:
                consumers_of.setdefault(d, []).append(id(n))
        ready = [n for n in nodes if waiting[id(n)] == 0]
        stack = sorted(ready, key=lambda n: -keras_rank[id(n)])
        order = []
        while stack:
            n = stack.pop()
            order.append(n)
            newly = []
            for c in consumers_of.get(id(n), ()):
                waiting[c] -= 1
                if waiting[c] == 0:
                    newly.append(by_id[c])
            stack.extend(sorted(newly, key=lambda m: keras_rank[id(m)]))
        if len(order) != len(nodes):
            raise ConfigError(f"Model '{model.name}': its graph has a cycle or a node that never becomes ready.")

        self.calls: list[LayerCall] = []
        seen_layers: dict[int, int] = {}
        call_count: dict[int, int] = {}
        for idx, n in enumerate(order):
            layer = n.operation
            for t in n.input_tensors:
                if id(t) not in self._tensor_of:
                    raise ConfigError(
                        f"Layer '{layer.name}' reads tensor '{t.name}', which is neither a model "
                        "input nor produced inside the model. Models must be closed graphs."
                    )
            ins = tuple(dict.fromkeys(self._tensor_of[id(t)] for t in n.input_tensors))
            outs = tuple(self._add_tensor(t, producer=idx, label=layer.name if len(n.outputs) == 1 else f"{layer.name}:{k}") for k, t in enumerate(n.outputs))
            k = call_count.get(id(layer), 0)
            call_count[id(layer)] = k + 1
            first = id(layer) not in seen_layers
            seen_layers.setdefault(id(layer), idx)
            pbytes = sum(int(np.prod(w.shape)) * np_dtype(w.dtype).itemsize for w in layer.weights) if first else 0
            pcount = sum(int(np.prod(w.shape)) for w in layer.weights)
            self.calls.append(
                LayerCall(
                    index=idx,
                    name=layer.name if k == 0 else f"{layer.name}#{k}",
                    node=n,
                    layer=layer,
                    inputs=ins,
                    outputs=outs,
                    param_bytes=pbytes,
                    act_bytes=sum(self.tensors[o].bytes_per_sample for o in outs),
                    flops=_flops(layer, n.input_tensors, n.outputs, pcount),
                )
            )
            for i in ins:
                self.tensors[i].consumers.append(idx)

        self.output_tensors = [self._tensor_of[id(t)] for t in fn.outputs]
        self.output_names = list(getattr(model, "output_names", None) or [t.name for t in fn.outputs])
        self.input_names = [t.name for t in fn.inputs]
        # Positions after which a cut is allowed: calls of one layer stay in one stage.
        span: dict[int, tuple[int, int]] = {}
        for c in self.calls:
            lo, hi = span.get(id(c.layer), (c.index, c.index))
            span[id(c.layer)] = (min(lo, c.index), max(hi, c.index))
        blocked = [0] * (len(self.calls) + 1)
        for lo, hi in span.values():
            if hi > lo:
                blocked[lo] += 1
                blocked[hi] -= 1
        running, self.cuttable = 0, []
        for i in range(len(self.calls)):
            running += blocked[i]
            self.cuttable.append(running == 0)  # may a stage end after call i?

    def _add_tensor(self, t, producer: int, model_input: int = -1, label: str = "") -> int:
        if id(t) in self._tensor_of:
            return self._tensor_of[id(t)]
        info = TensorInfo(
            index=len(self.tensors),
            ref=t,
            shape=tuple(t.shape[1:]),
            dtype=str(t.dtype),
            producer=producer,
            model_input=model_input,
            label=label,
        )
        self.tensors.append(info)
        self._tensor_of[id(t)] = info.index
        return info.index

    def __len__(self) -> int:
        return len(self.calls)

    @property
    def fingerprint(self) -> str:
        """The structure: layer types, connections, weight shapes and dtypes."""
        h = hashlib.sha256()
        for c in self.calls:
            h.update(f"{type(c.layer).__name__}|{c.inputs}|{c.outputs}|{[(tuple(w.shape), str(w.dtype)) for w in c.layer.weights]}".encode())
        return h.hexdigest()[:16]

    def set_costs(self, balance: str, sample_batch: int = 8) -> None:
        """Fill `call.cost` with the chosen cost model ("time", "flops" or "params")."""
        if balance not in COST_MODELS:
            raise ConfigError(f"balance={balance!r}: expected one of {COST_MODELS}, a list of layer counts per stage, or a list of layer names to cut after.")
        if balance == "params":
            costs = [c.param_bytes for c in self.calls]
        elif balance == "flops":
            costs = [c.flops for c in self.calls]
        else:
            costs = self._profile(sample_batch)
        # A floor keeps parameter-free layers from being free to stack up in one stage.
        floor = max(max(costs) * 1e-3, 1e-12) if costs else 1.0
        for c, v in zip(self.calls, costs):
            c.cost = max(float(v), floor)

    def _profile(self, batch: int) -> list[float]:
        """Measured forward+backward seconds of each call per `batch` samples.

        Each call is timed at `batch` and at 4 x `batch` samples (best of 3); the
        difference is the cost that grows with the data, free of the fixed per-call
        Python overhead that a compiled stage does not pay.
        """
        import tensorflow as tf

        rng = np.random.default_rng(0)

        def sample(t: TensorInfo, n: int):
            shape = (n,) + tuple(d or 1 for d in t.shape)
            if t.is_float:
                return tf.constant(rng.standard_normal(shape), dtype=t.dtype)
            return tf.zeros(shape, dtype=t.dtype)

        def timed(c: LayerCall, feeds) -> tuple[float, dict]:
            best, outs = math.inf, {}
            for _ in range(3):
                t0 = time.perf_counter()
                with tf.GradientTape() as tape:
                    floats = [v for v in feeds.values() if v.dtype.is_floating]
                    tape.watch(floats)
                    outs = run_call(c, feeds, self.tensors, training=True)
                    total = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32)) for o in outs.values()])
                sources = floats + list(c.layer.trainable_weights)
                if sources:
                    tape.gradient(total, sources, unconnected_gradients="zero")
                best = min(best, time.perf_counter() - t0)
            return best, outs

        small: dict[int, Any] = {}
        large: dict[int, Any] = {}
        times = []
        for c in self.calls:
            t_small, out_small = timed(c, {i: small[i] if i in small else sample(self.tensors[i], batch) for i in c.inputs})
            t_large, out_large = timed(c, {i: large[i] if i in large else sample(self.tensors[i], 4 * batch) for i in c.inputs})
            small.update(out_small)
            large.update(out_large)
            times.append(max(t_large - t_small, 0.0) / 3.0)
        return times


def run_call(call: LayerCall, values: dict[int, Any], tensors: list[TensorInfo], training: bool) -> dict[int, Any]:
    """Run one layer call; `values` maps tensor index -> value. Returns its outputs by index."""
    import keras

    by_ref = {id(tensors[i].ref): values[i] for i in call.inputs}
    args, kwargs = call.node.arguments.fill_in(by_ref)
    if "training" in keras_compat.call_context_args(call.layer):
        kwargs["training"] = training
    out = keras.tree.flatten(call.layer(*args, **kwargs))
    return dict(zip(call.outputs, out))


def balanced_cuts(costs: list[float], cuttable: list[bool], parts: int, memory: list[float] | None = None, memory_limit: float | None = None) -> list[int]:
    """Stage start indices minimising the largest stage cost (contiguous stages).

    Exact up to float resolution: bisection on the bottleneck value, each probe a
    greedy feasibility test (furthest legal cut under both the cost and the memory
    bound), which is optimal for contiguous partitions of positive weights.
    """
    n = len(costs)
    units = []  # (start, end) runs that cannot be split
    start = 0
    for i in range(n):
        if cuttable[i] or i == n - 1:
            units.append((start, i + 1))
            start = i + 1
    if parts > len(units):
        raise ConfigError(
            f"Cannot split {n} layer calls into {parts} stages: only {len(units)} places can be cut "
            "(calls of a shared layer must stay in one stage). Use fewer partitions."
        )
    ucost = [sum(costs[a:b]) for a, b in units]
    umem = [sum(memory[a:b]) for a, b in units] if memory is not None else [0.0] * len(units)
    cap = memory_limit if memory_limit is not None else math.inf
    if max(umem) > cap:
        raise ConfigError(f"memory_limit={memory_limit:.0f} bytes is below the largest single layer's estimate ({max(umem):.0f} bytes).")

    def greedy(limit: float) -> list[int] | None:
        starts, acc, mem = [0], 0.0, 0.0
        for u, (c, m) in enumerate(zip(ucost, umem)):
            if u > starts[-1] and (acc + c > limit or mem + m > cap):
                starts.append(u)
                acc, mem = 0.0, 0.0
            if c > limit:
                return None
            acc, mem = acc + c, mem + m
        return starts if len(starts) <= parts else None

    lo, hi = max(ucost), sum(ucost)
    if greedy(hi) is None:
        raise ConfigError(f"No split into {parts} stages keeps every stage under memory_limit={memory_limit:.0f} bytes; use more partitions or a higher limit.")
    for _ in range(100):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        if greedy(mid) is None:
            lo = mid
        else:
            hi = mid
    starts = greedy(hi)
    # Fewer stages than asked: split the costliest multi-unit stages (never raises the max).
    while len(starts) < parts:
        bounds = starts + [len(units)]
        sizes = [(sum(ucost[bounds[k] : bounds[k + 1]]), k) for k in range(len(starts)) if bounds[k + 1] - bounds[k] > 1]
        _, k = max(sizes)
        a, b = bounds[k], bounds[k + 1]
        half, acc, cut = sum(ucost[a:b]) / 2, 0.0, a + 1
        for u in range(a, b - 1):
            acc += ucost[u]
            cut = u + 1
            if acc >= half:
                break
        starts = sorted(starts + [cut])
    return [units[u][0] for u in starts]
