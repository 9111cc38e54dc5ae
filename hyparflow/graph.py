"""The model graph: a Keras functional model as a flat, topologically ordered list
of calls (layers and plain ops such as `x + 1`), with the per-call costs the
partitioner balances.

Nested functional and Sequential models are expanded in place, so that their inner
layers are planned, cut and balanced like top-level ones; the user's model and its
variables are left as they are. Implicit Keras masks become tensors of their own, so
that they can cross stage boundaries beside the tensors they mask.

Walks over the graph are iterative, so graphs of thousands of layers (ResNet-1001, the
5,000-layer models of HyPar-Flow) need no recursion-limit tricks; only the nesting of
models (a few levels) is followed recursively.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hyparflow import keras_compat
from hyparflow.errors import ConfigError

COST_MODELS = ("time", "flops", "params")
# Above this many layer calls, "time" profiling costs more than it is worth.
TIME_PROFILE_MAX_CALLS = 100

Key = tuple[int, int]  # a symbolic tensor in one expansion of the nesting: (instance, id(KerasTensor))


@dataclass
class TensorInfo:
    """One edge of the graph: a symbolic tensor, its per-sample shape and dtype."""

    index: int
    ref: Any  # the KerasTensor (for a tensor inside a nested model: the inner one)
    shape: tuple[int | None, ...]  # without the batch dimension
    dtype: str
    producer: int  # index of the producing call, -1 for a model input
    model_input: int = -1  # position among model.inputs, or -1
    consumers: list[int] = field(default_factory=list)

    batched: bool = True  # its symbolic first axis is the batch's (not fixed, as a table made once for all is)
    label: str = ""  # the producing call's name (":k" for its k-th output), or the input's
    mask: int = -1  # index of the tensor holding this tensor's Keras mask, or -1
    mask_of: int = -1  # for a mask tensor: index of the tensor it masks, else -1

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
    """One call of one layer or op (a node of the Keras graph, nesting expanded)."""

    index: int
    name: str  # "outer/inner/layer" inside nested models, suffixed "#k" for a repeated call
    node: Any
    layer: Any  # the Layer, or the Operation of a plain op
    inputs: tuple[int, ...]  # tensor indices
    outputs: tuple[int, ...]
    param_bytes: int  # zero for the second and later calls of a shared layer
    act_bytes: int  # output bytes per sample
    flops: float  # per sample, estimated
    args: tuple[tuple[int, int], ...] = ()  # (id of a KerasTensor in node.arguments, tensor index)
    context: dict[str, Any] = field(default_factory=dict)  # call-context arguments of enclosing nested calls
    cost: float = 0.0  # what balancing uses; set by ModelGraph.set_costs


def np_dtype(dtype) -> np.dtype:
    """The NumPy dtype of a TensorFlow / Keras dtype (bfloat16 included, via ml_dtypes)."""
    import tensorflow as tf

    return np.dtype(tf.as_dtype(dtype).as_numpy_dtype)


def weights_of(op) -> list[Any]:
    """The weights of a call's layer; a plain op (`x + 1`, `ops.mean`) has none."""
    return list(getattr(op, "weights", ()))


def _functional(model):
    """The functional graph behind `model`, or a clear error if it has none."""
    import keras

    fn = keras_compat.functional_graph(model)
    if fn is not None and keras_compat.plain_functional(model) is not None:
        return fn
    if isinstance(model, keras.Sequential) and fn is None:
        raise ConfigError(
            f"Sequential model '{model.name}' is not built: give its first layer an "
            "input shape (keras.Input(shape=...)) or call model.build(input_shape) first."
        )
    if fn is not None:
        raise ConfigError(
            f"Model '{model.name}' ({type(model).__name__}) overrides call(), so its functional graph need not be "
            "what it computes and cannot be split safely. Use num_partitions=1 (pure data parallelism), or move "
            "the extra computation into layers of the graph and drop the call() override."
        )
    raise ConfigError(
        f"Model '{model.name}' ({type(model).__name__}) is a subclassed model with no "
        "functional graph, so it cannot be split into stages. Use num_partitions=1 "
        "(pure data parallelism), or rewrite it with the functional API "
        "(keras.Input -> layers -> keras.Model(inputs, outputs))."
    )


def _flops(layer, out_shapes, param_count) -> float:
    """Per-sample FLOPs estimate: 2 x MACs for layers with a kernel, else element count."""
    out_elems = sum(int(np.prod([d or 1 for d in s])) for s in out_shapes)
    kernel = getattr(layer, "kernel", None) if weights_of(layer) else None
    if kernel is not None and hasattr(kernel, "shape") and len(kernel.shape) >= 2:
        k = int(np.prod(kernel.shape))
        if type(layer).__name__.startswith("Depthwise"):
            return 2.0 * out_elems * int(np.prod(kernel.shape[:-2]))
        return 2.0 * k * out_elems / max(int(kernel.shape[-1]), 1)
    if param_count and hasattr(layer, "layers"):  # a nested model kept whole
        return 2.0 * param_count + out_elems
    return float(out_elems)


@dataclass
class _Site:
    """A node reached through the nesting of models, before ordering."""

    node: Any
    prefix: str  # "outer/" for a node inside nested model "outer"
    context: dict[str, Any]
    args: list[tuple[int, Key]]  # (id of the node's KerasTensor argument, its tensor's key)
    outs: list[Key]


class _Expansion:
    """The nodes of a functional model in Keras's order, each nested functional model's
    nodes listed in place of its call. A nested model's inputs are identified with the
    tensors passed at its call and the call's outputs with the inner outputs; a nested
    model called twice is expanded twice (its layers then have two calls each)."""

    def __init__(self, fn):
        self.sites: list[_Site] = []
        self.alias: dict[Key, Key] = {}
        self.instances = 0
        self.expanded: dict[int, int] = {}  # id(nested model) -> times expanded so far
        self.walk(fn, 0, "", {})

    def key(self, instance: int, t) -> Key:
        k = (instance, id(t))
        return self.alias.get(k, k)

    def walk(self, fn, instance: int, prefix: str, context: dict[str, Any]) -> None:
        by_depth = keras_compat.nodes_by_depth(fn)
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                if node.operation is None or node.is_input:
                    continue
                args = [(id(t), self.key(instance, t)) for t in node.input_tensors]
                inner = _expandable(node)
                if inner is None:
                    outs = [(instance, id(t)) for t in node.outputs]
                    self.sites.append(_Site(node, prefix, context, args, outs))
                    continue
                model = node.operation
                k = self.expanded.get(id(model), 0)
                self.expanded[id(model)] = k + 1
                self.instances += 1
                sub = self.instances
                for t, given in zip(inner.inputs, _call_inputs(node, inner)):
                    self.alias[(sub, id(t))] = self.key(instance, given)
                # Arguments given at the nested call (training=False, ...) hold for its whole inside.
                kwargs = node.arguments.kwargs
                explicit = {n: v for n, v in kwargs.items() if n not in ("inputs", "mask") and v is not None}
                self.walk(inner, sub, f"{prefix}{model.name}{f'#{k}' if k else ''}/", {**context, **explicit})
                for t, out in zip(node.outputs, inner.outputs):
                    self.alias[(instance, id(t))] = self.key(sub, out)


def _call_inputs(node, fn) -> list[Any]:
    """The tensors a nested-model call passes, in the order of `fn.inputs`."""
    import keras

    args, kwargs = node.arguments.args, node.arguments.kwargs
    given = args[0] if args else kwargs.get("inputs")
    if isinstance(given, dict) and not isinstance(keras_compat.inputs_structure(fn), dict):
        given = [given.get(t.name) for t in fn.inputs]
    return keras.tree.flatten(given)


def _expandable(node):
    """The functional graph to expand a nested-model call into, or None to keep the call
    whole: a layer, a subclassed model, or a call that Keras would adapt (an explicit
    mask, extra positional arguments, inputs of another dtype or rank)."""
    import keras

    fn = keras_compat.plain_functional(node.operation)
    masks = keras.tree.flatten(node.arguments.kwargs.get("mask"))
    if fn is None or len(node.arguments.args) > 1 or any(m is not None for m in masks):
        return None
    given = _call_inputs(node, fn)
    if len(given) != len(fn.inputs) or len(node.outputs) != len(fn.outputs):
        return None
    for g, t in zip(given, fn.inputs):
        if not isinstance(g, keras.KerasTensor) or g.dtype != t.dtype or len(g.shape) != len(t.shape):
            return None
    return fn


def _refined_shapes(site: _Site, arg_shapes: dict[int, tuple]) -> list[tuple] | None:
    """Output shapes of a call whose inputs are known more precisely than when Keras built
    it (a nested model built for any sequence length, called on a fixed-length input),
    by Keras's own shape inference; None if that fails (the built shapes then stand)."""
    import keras

    dtypes = {id(t): t.dtype for t in site.node.input_tensors}
    specs = {ref: keras.KerasTensor((None,) + arg_shapes[ref], dtype=dtypes[ref]) for ref, _ in site.args}
    args, kwargs = site.node.arguments.fill_in(specs)
    try:
        out = keras.tree.flatten(site.node.operation.compute_output_spec(*args, **kwargs))
    except Exception:  # shape inference only refines: on any failure the built shapes stand
        return None
    return [tuple(o.shape[1:]) for o in out] if len(out) == len(site.node.outputs) else None


class ModelGraph:
    """Calls of a functional model in a topological order, with costs.

    The order is depth-first from the inputs: of the calls a call makes ready, the one
    closest to an output goes first (an auxiliary head stays next to the layer feeding
    it, a branch is finished before the next starts), while branches that start at a
    model input wait until the graph needs them (a late input is read late).
    """

    def __init__(self, model):
        self.model = model
        self.profiler: Profiler | None = None  # made by the "time" cost model
        fn = _functional(model)
        self.functional = fn
        expansion = _Expansion(fn)
        sites = expansion.sites

        self.tensors: list[TensorInfo] = []
        self._tensor_of: dict[Key, int] = {}
        for i, t in enumerate(fn.inputs):
            self._add_tensor(t, (0, id(t)), tuple(t.shape[1:]), producer=-1, model_input=i)

        # Kahn's algorithm, LIFO among ready sites (depth-first), Keras order as tie-break.
        produced_by = {k: s for s, site in enumerate(sites) for k in site.outs}
        waiting = []
        consumers_of: dict[int, list[int]] = {}
        for s, site in enumerate(sites):
            deps = {produced_by[k] for _, k in site.args if k in produced_by}
            waiting.append(len(deps))
            for d in deps:
                consumers_of.setdefault(d, []).append(s)
        stack = sorted((s for s in range(len(sites)) if waiting[s] == 0), reverse=True)
        order = []
        while stack:
            s = stack.pop()
            order.append(sites[s])
            newly = []
            for c in consumers_of.get(s, ()):
                waiting[c] -= 1
                if waiting[c] == 0:
                    newly.append(c)
            stack.extend(sorted(newly))
        if len(order) != len(sites):
            raise ConfigError(f"Model '{model.name}': its graph has a cycle or a node that never becomes ready.")

        self.calls: list[LayerCall] = []
        seen_layers: set[int] = set()
        names: dict[str, int] = {}
        for idx, site in enumerate(order):
            self.calls.append(self._call(idx, site, names, first=id(site.node.operation) not in seen_layers))
            seen_layers.add(id(site.node.operation))

        self.output_tensors = [self._tensor_of[expansion.key(0, t)] for t in fn.outputs]
        self.output_names = list(getattr(model, "output_names", None) or [t.name for t in fn.outputs])
        self.input_names = [t.name for t in fn.inputs]
        self._add_masks()

    def _call(self, idx: int, site: _Site, names: dict[str, int], first: bool) -> LayerCall:
        op = site.node.operation
        for ref, k in site.args:
            if k not in self._tensor_of:
                t = next(t for t in site.node.input_tensors if id(t) == ref)
                raise ConfigError(
                    f"Layer '{site.prefix}{op.name}' reads tensor '{t.name}', which is neither a model "
                    "input nor produced inside the model. Models must be closed graphs."
                )
        arg_shapes = {ref: self.tensors[self._tensor_of[k]].shape for ref, k in site.args}
        shapes = [tuple(t.shape[1:]) for t in site.node.outputs]
        if any(tuple(t.shape[1:]) != arg_shapes[id(t)] for t in site.node.input_tensors):
            shapes = _refined_shapes(site, arg_shapes) or shapes
        base = site.prefix + op.name
        count = names.get(base, 0)
        names[base] = count + 1
        name = base if count == 0 else f"{base}#{count}"
        single = len(site.outs) == 1
        ins = tuple(dict.fromkeys(self._tensor_of[k] for _, k in site.args))
        # A fixed first axis is a table made once for all samples, unless the call mixes such
        # a table with batched inputs (Keras's broadcasting then fixes the batch axis too) or
        # reads a batched tensor whose axis was fixed so.
        given = [self.tensors[i] for i in ins]
        inherits = len({g.batched for g in given}) > 1 or any(g.batched and g.ref.shape[:1] != (None,) for g in given)
        outs = tuple(
            self._add_tensor(
                t, key, shape, producer=idx, label=name if single else f"{name}:{j}", batched=inherits or None
            )
            for j, (t, key, shape) in enumerate(zip(site.node.outputs, site.outs, shapes))
        )
        for i in ins:
            self.tensors[i].consumers.append(idx)
        weights = weights_of(op)
        return LayerCall(
            index=idx,
            name=name,
            node=site.node,
            layer=op,
            inputs=ins,
            outputs=outs,
            param_bytes=sum(int(np.prod(w.shape)) * np_dtype(w.dtype).itemsize for w in weights) if first else 0,
            act_bytes=sum(self.tensors[o].bytes_per_sample for o in outs),
            flops=_flops(op, shapes, sum(int(np.prod(w.shape)) for w in weights)),
            args=tuple((ref, self._tensor_of[k]) for ref, k in site.args),
            context=site.context,
        )

    def _add_tensor(
        self, t, key: Key, shape: tuple, producer: int, model_input: int = -1, label: str = "", batched=None
    ) -> int:
        if key in self._tensor_of:
            return self._tensor_of[key]
        if batched is None:
            batched = len(t.shape) > 0 and t.shape[0] in (None, self.functional.inputs[0].shape[0])
        info = TensorInfo(
            len(self.tensors), t, shape, str(t.dtype), producer, model_input, batched=batched, label=label
        )
        self.tensors.append(info)
        self._tensor_of[key] = info.index
        return info.index

    def _add_masks(self) -> None:
        """A tensor of its own for the Keras mask of every tensor that carries one when the
        model is built: it has the same producer and consumers, so it crosses exactly the
        stage boundaries its tensor crosses. A mask's unknown dimensions are taken from the
        leading dimensions of the tensor it masks (a (T,) mask for a (T, D) tensor)."""
        for t in list(self.tensors):
            m = keras_compat.get_keras_mask(t.ref)
            if m is None or t.producer < 0 or not t.consumers:
                continue
            shape = tuple(t.shape[i] if d is None and i < len(t.shape) else d for i, d in enumerate(m.shape[1:]))
            info = TensorInfo(
                index=len(self.tensors),
                ref=m,
                shape=shape,
                dtype=str(m.dtype),
                producer=t.producer,
                consumers=list(t.consumers),
                label=f"{t.name}.mask",
                mask_of=t.index,
            )
            t.mask = info.index
            self.tensors.append(info)

    def __len__(self) -> int:
        return len(self.calls)

    def uncuttable(self) -> set[int]:
        """Stage starts that would send a tensor whose symbolic first axis is fixed (made once
        for all samples, as a rotary position table is): micro-batches cannot split it.
        Keras's shape inference can fix a batch axis too (broadcasting against such a
        table), so the planner avoids these cuts where it can, and the executor checks."""
        return {k for t in self.tensors if not t.batched and t.producer >= 0
                for k in range(t.producer + 1, max(t.consumers, default=t.producer) + 1)}  # fmt: skip

    @property
    def fingerprint(self) -> str:
        """The structure: call types, connections, weight shapes and dtypes, call contexts."""
        h = hashlib.sha256()
        for c in self.calls:
            weights = [(tuple(w.shape), str(w.dtype)) for w in weights_of(c.layer)]
            h.update(f"{type(c.layer).__name__}|{c.inputs}|{c.outputs}|{weights}|{sorted(c.context.items())}".encode())
        return h.hexdigest()[:16]

    def set_costs(self, balance: str, microbatch_size: int = 8) -> None:
        """Fill `call.cost` with the chosen cost model ("time", "flops" or "params");
        "time" is measured on `microbatch_size` samples, the size a stage will run."""
        if balance not in COST_MODELS:
            raise ConfigError(
                f"balance={balance!r}: expected one of {COST_MODELS}, a list of layer counts per stage, or a list of "
                "layer names to cut after."
            )
        costs: list[float]
        if balance == "params":
            costs = [float(c.param_bytes) for c in self.calls]
        elif balance == "flops":
            costs = [c.flops for c in self.calls]
        else:
            costs = self._profile(microbatch_size)
        # A floor keeps parameter-free layers from being free to stack up in one stage.
        floor = max(max(costs) * 1e-3, 1e-12) if costs else 1.0
        for c, v in zip(self.calls, costs):
            c.cost = max(float(v), floor)

    def _profile(self, batch: int) -> list[float]:
        """Seconds each call adds to a compiled stage step (`Profiler.call_times`); the
        profiler is kept for `span_times`."""
        self.profiler = Profiler(self, batch)
        return self.profiler.call_times()

    def span_times(self, spans: Sequence[tuple[int, int]]) -> list[float]:
        """Seconds of the compiled step of each span of calls [a, b), on the micro-batch
        the "time" cost model was measured on."""
        if self.profiler is None:
            raise RuntimeError("span_times needs the time cost model's profile: set_costs('time') first")
        return self.profiler.span_times(spans)


class Profiler:
    """Times compiled forward+backward steps of a graph's calls on `batch` samples, less
    the cost of calling an empty compiled function. Per-op costs that do not grow with the
    data are kept: at small micro-batches they are much of a stage's time.

    The steps are timed in turns, `ROUNDS` rounds over all of them, each keeping its best:
    a machine whose speed drifts over seconds (a shared host) then favours no step over
    another. Timed one after another, ResNet-20's 2-stage cut ranged over calls 22-32 of 70.
    The calls run in training mode, so the variables they update (BatchNorm statistics,
    seeds) are restored after the timings."""

    ROUNDS = 10

    def __init__(self, graph: ModelGraph, batch: int):
        import tensorflow as tf

        self.graph, self.batch = graph, batch
        self.values: dict[int, Any] = {}  # every tensor's value, as the calls made it from samples
        self._rng = np.random.default_rng(0)
        self._empty = (keras_compat.traced_once(lambda feeds: feeds), {0: tf.zeros((batch,))})

    def _sample(self, t: TensorInfo):
        import tensorflow as tf

        if t.index in self.values:
            return self.values[t.index]
        shape = (self.batch,) + tuple(d or 1 for d in t.shape)
        if t.is_float:
            return tf.constant(self._rng.standard_normal(shape), dtype=t.dtype)
        return tf.zeros(shape, dtype=t.dtype)

    def _step(self, calls: list[LayerCall]) -> tuple[Any, dict[int, Any]]:
        """One compiled step of `calls` in order, traced, and its feeds; their outputs join `values`."""
        import tensorflow as tf

        made = {i for c in calls for i in c.outputs}
        feeds = {i: self._sample(self.graph.tensors[i]) for c in calls for i in c.inputs if i not in made}
        used = {i for c in calls for i in c.inputs}
        leaving = [i for i in made if i not in used] or list(calls[-1].outputs)
        weights = list({id(w): w for c in calls for w in getattr(c.layer, "trainable_weights", ())}.values())

        def step(feeds):
            floats = [v for v in feeds.values() if v.dtype.is_floating]
            values = dict(feeds)
            with tf.GradientTape() as tape:
                tape.watch(floats)
                for c in calls:
                    values.update(run_call(c, values, training=True))
                total = tf.add_n([tf.reduce_sum(tf.cast(values[i], tf.float32)) for i in leaving])
            sources = floats + weights
            grads = tape.gradient(total, sources, unconnected_gradients="zero") if sources else []
            return {i: values[i] for i in made}, grads

        fn = keras_compat.traced_once(step)
        outs, _ = fn(feeds)
        self.values.update(outs)
        return fn, feeds

    def _times(self, spans: Sequence[list[LayerCall]]) -> list[float]:
        """Seconds of one compiled step of each span of calls, timed in turns."""
        layers = {id(c.layer): c.layer for calls in spans for c in calls}.values()
        state = [(v, v.numpy()) for layer in layers for v in getattr(layer, "non_trainable_variables", ())]
        runs = [self._empty] + [self._step(calls) for calls in spans]
        best = [math.inf] * len(runs)
        for _ in range(self.ROUNDS):
            for k, (fn, feeds) in enumerate(runs):
                t0 = time.perf_counter()
                fn(feeds)
                best[k] = min(best[k], time.perf_counter() - t0)
        for v, value in state:
            v.assign(value)
        return [max(t - best[0], 0.0) for t in best[1:]]

    def call_times(self) -> list[float]:
        return self._times([[c] for c in self.graph.calls])

    def span_times(self, spans: Sequence[tuple[int, int]]) -> list[float]:
        return self._times([self.graph.calls[a:b] for a, b in spans])


def run_call(call: LayerCall, values: dict[int, Any], training: bool) -> dict[int, Any]:
    """Run one call; `values` maps tensor index -> value. Returns its outputs by index.

    Call-context arguments follow Keras's functional models (`functional.operation_fn`):
    the stage's `training` overrides what the graph recorded (Keras records each layer's
    default there, e.g. Dropout's `training=False`), even an explicit `base(x,
    training=False)`, as Keras 3's `fit` does; other context arguments keep the value
    given at an enclosing nested-model call, else the recorded one.
    """
    import keras

    args, kwargs = call.node.arguments.fill_in({ref: values[i] for ref, i in call.args})
    for name in keras_compat.call_context_args(call.layer):
        value = training if name == "training" else call.context.get(name)
        if value is not None:
            kwargs[name] = value
    out = keras.tree.flatten(call.layer(*args, **kwargs))
    return dict(zip(call.outputs, out))
