"""The partition plan: contiguous stages of a model graph, their boundary tensors,
and stage callables that share the original layers and variables.

Skip connections that jump over stages are sent directly from the producing stage to
every stage that consumes them (and their gradients straight back), never forwarded
through the stages in between. Model inputs are read by each stage that uses them
from its own copy of the data.

A layer called in several stages (tied weights, e.g. a language model's input embedding
reused for its logits) lives on each of them: `Plan.tied` lists its variables, whose
gradients the engine sums over those stages. A tensor's Keras mask crosses a boundary as
a tensor of its own and is attached again on the receiving stage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from hyparflow import keras_compat, memory
from hyparflow.errors import ConfigError
from hyparflow.graph import (
    COST_MODELS,
    TIME_PROFILE_MAX_CALLS,
    LayerCall,
    ModelGraph,
    TensorInfo,
    np_dtype,
    run_call,
    weights_of,
)


@dataclass
class Stage:
    """One pipeline stage: a contiguous run of layer calls."""

    index: int
    calls: list[LayerCall]
    tensors: list[TensorInfo] = field(repr=False)
    recv: list[int] = field(default_factory=list)  # boundary tensors received, in plan order
    send: list[tuple[int, int]] = field(default_factory=list)  # (tensor, destination stage)
    data_inputs: list[int] = field(default_factory=list)  # positions in model.inputs read here
    model_outputs: list[int] = field(default_factory=list)  # positions in model.outputs made here
    output_tensors: list[int] = field(default_factory=list, repr=False)
    # Layers this stage shares with an earlier stage: their weight regularizers count there.
    tied_earlier: set[int] = field(default_factory=set, repr=False)
    _call_losses: list[Any] = field(default_factory=list, init=False, repr=False)

    @property
    def layers(self) -> list[str]:
        return [c.name for c in self.calls]

    @property
    def cost(self) -> float:
        return sum(c.cost for c in self.calls)

    @property
    def param_bytes(self) -> int:
        """Bytes of the weights held here (a tied layer counts on every stage holding it)."""
        weights = {id(w): w for layer in self.unique_layers for w in weights_of(layer)}.values()
        return sum(int(np.prod(w.shape)) * np_dtype(w.dtype).itemsize for w in weights)

    @property
    def inputs(self) -> list[TensorInfo]:
        """Boundary tensors received from earlier stages."""
        return [self.tensors[i] for i in self.recv]

    @property
    def outputs(self) -> list[TensorInfo]:
        """Boundary tensors sent to later stages (each once, whatever its destinations)."""
        return [self.tensors[i] for i in dict.fromkeys(t for t, _ in self.send)]

    @property
    def unique_layers(self) -> list[Any]:
        """The layers called here, each once (plain ops such as `x + 1` are no layers)."""
        return list({id(c.layer): c.layer for c in self.calls if isinstance(c.layer, keras.layers.Layer)}.values())

    @property
    def trainable_variables(self) -> list[Any]:
        return _unique_vars(v for layer in self.unique_layers for v in layer.trainable_variables)

    @property
    def variables(self) -> list[Any]:
        return _unique_vars(v for layer in self.unique_layers for v in layer.variables)

    @property
    def losses(self) -> list[Any]:
        """All regularization and `add_loss` losses of this stage's layers (after forward)."""
        return self.weight_losses + self.call_losses

    @property
    def weight_losses(self) -> list[Any]:
        """Weight regularizer losses: they depend on the weights only, not on the batch.
        A tied layer's count on the first stage holding it only."""
        layers = [layer for layer in self.unique_layers if id(layer) not in self.tied_earlier]
        return [loss for layer in layers for loss in keras_compat.regularization_losses(layer)]

    @property
    def call_losses(self) -> list[Any]:
        """Losses added during the last forward (activity regularizers, `add_loss` in call):
        computed on that batch, so they add up over micro-batches. Collected after every
        call, as Keras clears a layer's losses when it is called again."""
        return list(self._call_losses)

    def forward(self, feeds: dict[int, Any], training: bool) -> dict[int, Any]:
        """Run the stage. `feeds` maps tensor index -> value for its received boundary
        tensors (masks included) and its model inputs; returns values for every tensor it
        sends (masks included) and every model output it produces."""
        values = self._run(feeds, training)
        wanted = [t for t, _ in self.send] + self.output_tensors
        return {t: self._mask(values, t) if self.tensors[t].mask_of >= 0 else values[t] for t in wanted}

    def _run(self, feeds: dict[int, Any], training: bool) -> dict[int, Any]:
        """Attach the received masks to their tensors, run the calls; returns all values."""
        values = dict(feeds)
        for t in self.recv:
            if self.tensors[t].mask_of >= 0:
                keras_compat.set_keras_mask(values[self.tensors[t].mask_of], values[t])
        self._call_losses = []
        for call in self.calls:
            values.update(run_call(call, values, training))
            if isinstance(call.layer, keras.layers.Layer):
                self._call_losses += keras_compat.own_call_losses(call.layer)
        return values

    def _mask(self, values: dict[int, Any], t: int) -> Any:
        mask = keras_compat.get_keras_mask(values[self.tensors[t].mask_of])
        if mask is None:
            raise ConfigError(
                f"Tensor '{self.tensors[self.tensors[t].mask_of].name}' had a Keras mask when the plan was made but "
                "has none now; its mask cannot be sent to the next stage. Plan again for this model as it is now."
            )
        return mask


def _unique_vars(variables) -> list[Any]:
    return list({id(v): v for v in variables}.values())


class Plan:
    """A model split into `num_partitions` stages; `print(plan)` shows the table."""

    def __init__(self, graph: ModelGraph, starts: Sequence[int], balance: str):
        self.graph = graph
        self.balance = balance
        self.memory: list[memory.StageMemory] | None = None  # estimated bytes per rank of each stage, if asked
        self.microbatch_size = 1
        self.call_costs: list[float] = []  # per layer call, what a cost model balanced (`recut` rescales them)
        self.call_memory: list[float] = []  # per layer call, the bytes `memory_limit` bounded
        self.starts = list(starts)
        n = len(graph.calls)
        bounds = self.starts + [n]
        stage_of = [0] * n
        self.stages: list[Stage] = []
        for s in range(len(self.starts)):
            for i in range(bounds[s], bounds[s + 1]):
                stage_of[i] = s
            self.stages.append(Stage(index=s, calls=graph.calls[bounds[s] : bounds[s + 1]], tensors=graph.tensors))
        self.stage_of_call = stage_of
        for info in graph.tensors:
            if info.producer < 0:
                for s in sorted({stage_of[c] for c in info.consumers}):
                    self.stages[s].data_inputs.append(info.model_input)
                continue
            src = stage_of[info.producer]
            for dst in sorted({stage_of[c] for c in info.consumers} - {src}):
                self.stages[src].send.append((info.index, dst))
                self.stages[dst].recv.append(info.index)
        for pos, t in enumerate(graph.output_tensors):
            producer = graph.tensors[t].producer
            if producer < 0:
                raise ConfigError(
                    f"Model output '{graph.output_names[pos]}' is a model input passed straight through; hyparflow "
                    "needs every output produced by a layer."
                )
            stage = self.stages[stage_of[producer]]
            stage.model_outputs.append(pos)
            stage.output_tensors.append(t)
        for st in self.stages:
            st.data_inputs.sort()
        first_holder: dict[int, int] = {}
        for st in self.stages:
            for layer in st.unique_layers:
                if first_holder.setdefault(id(layer), st.index) != st.index:
                    st.tied_earlier.add(id(layer))
        if any(graph.tensors[t].mask_of >= 0 for t in self.boundary):
            self._send_present_masks_only()
        for t in self.boundary:
            info = graph.tensors[t]
            if any(d is None for d in info.shape):
                raise ConfigError(
                    f"Boundary tensor '{info.name}' has shape {info.shape} with unknown dimensions, which cannot be "
                    "sent "
                    "between stages; give the model's Input layers full shapes, or choose cuts (balance=[...]) that "
                    "avoid it."
                )

    def _send_present_masks_only(self) -> None:
        """Keep only the boundary masks that their tensors still carry when the sending stage
        ends. Keras builds masks symbolically, but at run time a layer may drop its inputs'
        masks (MultiHeadAttention does), and what a later consumer sees depends on the calls
        already run: one inference pass of the stages on a sample finds out."""
        tensors = self.graph.tensors
        values = {
            t.index: np.zeros((1, *(d or 1 for d in t.shape)), np_dtype(t.dtype)) for t in tensors if t.producer < 0
        }
        for st in self.stages:
            out = st._run({t: values[t] for t in st.recv + st.data_inputs}, training=False)
            for t, _ in st.send:
                values[t] = out[t] if tensors[t].mask_of < 0 else keras_compat.get_keras_mask(out[tensors[t].mask_of])
            absent = {t for t, _ in st.send if values[t] is None}
            st.send = [(t, d) for t, d in st.send if t not in absent]
            for later in self.stages[st.index + 1 :]:
                later.recv = [t for t in later.recv if t not in absent]

    @property
    def boundary(self) -> list[int]:
        """Tensors that cross a stage boundary, in a fixed order (their message tags)."""
        return sorted({t for st in self.stages for t, _ in st.send})

    @property
    def tied(self) -> list[tuple[Any, list[int]]]:
        """(variable, sorted stage indices) for every variable held by more than one stage:
        the layers it belongs to are called on each of those stages. The engine sums a tied
        trainable variable's gradients over its stages before the optimizer step, so the
        copies stay equal; a tied non-trainable variable (statistics of a normalization
        layer called on several stages) is updated by each stage's own calls and averaged
        over the holding stages at every epoch end (`loop.sync_replica_state`)."""
        holders: dict[int, tuple[Any, list[int]]] = {}
        for st in self.stages:
            for v in st.variables:
                holders.setdefault(id(v), (v, []))[1].append(st.index)
        return [(v, stages) for v, stages in holders.values() if len(stages) > 1]

    @property
    def num_partitions(self) -> int:
        return len(self.stages)

    def held(self, stages: Sequence[int]) -> Stage:
        """What a rank holding `stages` holds, as one stage: their calls, model inputs,
        model outputs (in the stages' order) and variables (a tied layer's once)."""
        if len(stages) == 1:
            return self.stages[stages[0]]
        parts = [self.stages[s] for s in stages]
        return Stage(
            index=-1,
            calls=[c for st in parts for c in st.calls],
            tensors=self.graph.tensors,
            data_inputs=sorted({i for st in parts for i in st.data_inputs}),
            model_outputs=[o for st in parts for o in st.model_outputs],
            output_tensors=[t for st in parts for t in st.output_tensors],
        )

    @property
    def fingerprint(self) -> str:
        """Identifies the graph's structure, its weights' shapes and the cuts (not the
        layers' names, which Keras numbers per process); equal on every rank."""
        h = hashlib.sha256(self.graph.fingerprint.encode())
        h.update(str(self.starts).encode())
        return h.hexdigest()[:16]

    def forward(self, inputs: Sequence[Any], training: bool = False) -> list[Any]:
        """Run the stages one after another in this process; returns the model outputs.
        A reference for tests and debugging: the result must equal `model(inputs)`. Each
        stage receives fresh copies of its boundary tensors, bare as from the network."""
        values = {self.graph.tensors[i].index: x for i, x in enumerate(inputs)}
        for st in self.stages:
            feeds = {t: keras.ops.copy(values[t]) for t in st.recv}
            feeds.update({i: values[i] for i in st.data_inputs})
            values.update(st.forward(feeds, training))
        return [values[t] for t in self.graph.output_tensors]

    def __str__(self) -> str:
        rows = [f"Plan: {len(self.graph)} layer calls in {self.num_partitions} stages (balance={self.balance})"]
        spans = [f"{s.layers[0]} .. {s.layers[-1]}" for s in self.stages]
        width = min(max(40, *map(len, spans)), 90)  # nested models make long names ("resnet50/conv1_conv")
        head = f"{'stage':>5} {'layers':>6}  {'first .. last':<{width}} {'cost':>10} {'params':>10}  in / out"
        rows += [head, "-" * len(head)]
        total = sum(s.cost for s in self.stages) or 1.0
        for s, span in zip(self.stages, spans):
            ins = ", ".join(f"{t.name}{list(t.shape)}" for t in s.inputs) or "-"
            outs = ", ".join(f"{self.graph.tensors[t].name}->{d}" for t, d in s.send) or "-"
            if s.model_outputs:
                outs += " | outputs: " + ", ".join(self.graph.output_names[i] for i in s.model_outputs)
            cost = f"{100 * s.cost / total:>9.1f}%"
            row = f"{s.index:>5} {len(s.calls):>6}  {span[:width]:<{width}} {cost} {_human(s.param_bytes):>10}"
            rows.append(f"{row}  {ins} / {outs}")
        holders: dict[int, tuple[str, set[int]]] = {}
        for st in self.stages:
            for c in st.calls:
                holders.setdefault(id(c.layer), (c.name, set()))[1].add(st.index)
        tied = [f"{name} {sorted(stages)}" for name, stages in holders.values() if len(stages) > 1]
        if tied:
            rows.append("tied layers (on several stages, their gradients summed): " + ", ".join(tied))
        if self.memory:
            rows.append(f"estimated memory per rank (micro-batch of {self.microbatch_size}, one in flight):")
            names = ("weights", "accumulators", "gradients", "optimizer", "activations", "total")
            rows.append(f"{'stage':>5} " + " ".join(f"{n:>12}" for n in names))
            for i, m in enumerate(self.memory):
                values = [getattr(m, n) for n in names]
                rows.append(f"{i:>5} " + " ".join(f"{_human(v):>12}" for v in values))
        return "\n".join(rows)

    __repr__ = __str__


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


def plan(
    model,
    num_partitions: int,
    balance: str | Sequence[int] | Sequence[str] | None = None,
    memory_limit: float | None = None,
    microbatch_size: int = 8,
) -> Plan:
    """Split `model` into `num_partitions` contiguous stages.

    balance: a cost model ("time": each layer call's compiled forward+backward
      measured on `microbatch_size` samples, rescaled per stage to the stage's own
      compiled step, "flops", "params"; default "time" for
      up to 100 layer calls, else "flops"), a list of layer-call counts per stage,
      or a list of layer names to cut after.
    memory_limit: bytes per stage for weights, gradient accumulators, one step's
      gradients, the compiled optimizer's slots and `microbatch_size` samples of
      activations; the plan's text shows this estimate per stage (`hyparflow.memory`).
    """
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError(f"num_partitions must be a positive integer, got {num_partitions!r}.")
    graph = ModelGraph(model)
    n = len(graph)
    if num_partitions > n:
        raise ConfigError(
            f"num_partitions={num_partitions} exceeds the {n} layer calls of model '{model.name}'; use at most {n}."
        )
    if balance is None:
        balance = "time" if n <= TIME_PROFILE_MAX_CALLS else "flops"
    optimizer = getattr(model, "optimizer", None)
    if isinstance(balance, str):
        graph.set_costs(balance, microbatch_size)
        # weights, accumulator, one step's gradient and the optimizer's slots, per parameter byte
        per_byte = 3 + memory.slots_per_variable(optimizer)
        need = [float(c.param_bytes * per_byte + c.act_bytes * microbatch_size) for c in graph.calls]
        starts = balanced_cuts([c.cost for c in graph.calls], num_partitions, need, memory_limit, graph.uncuttable())
        if balance == "time" and num_partitions > 1:
            starts = _calibrated(graph, starts, need, memory_limit)
        graph.profiler = None  # its sample activations, one per tensor, are needed no more
        planned = _with_memory(Plan(graph, starts, balance), optimizer, microbatch_size)
        planned.call_costs, planned.call_memory = [c.cost for c in graph.calls], need
        return planned
    graph.set_costs("flops")
    items: list[Any] = list(balance)
    if all(isinstance(b, int) for b in items):
        starts = _starts_from_counts(graph, items, num_partitions)
    elif all(isinstance(b, str) for b in items):
        starts = _starts_from_names(graph, items, num_partitions)
    else:
        raise ConfigError(
            f"balance={items!r}: a list must hold only layer counts (int) or only layer names (str); cost models are "
            f"{COST_MODELS}."
        )
    return _with_memory(Plan(graph, starts, "explicit"), optimizer, microbatch_size)


def _with_memory(p: Plan, optimizer, microbatch_size: int) -> Plan:
    p.memory = memory.estimate(p, optimizer, microbatch_size)
    p.microbatch_size = microbatch_size
    return p


def _starts_from_counts(graph: ModelGraph, counts: list[int], parts: int) -> list[int]:
    n = len(graph)
    if len(counts) != parts:
        raise ConfigError(
            f"balance gives {len(counts)} layer counts but num_partitions={parts}; give one count per stage."
        )
    if any(c < 1 for c in counts):
        raise ConfigError(f"balance={counts}: every stage needs at least one layer call.")
    if sum(counts) != n:
        raise ConfigError(
            f"balance={counts} sums to {sum(counts)} but model '{graph.model.name}' has {n} layer calls "
            "(hyparflow.plan(model, 1) lists them)."
        )
    starts, acc = [], 0
    for c in counts:
        starts.append(acc)
        acc += c
    return starts


def _starts_from_names(graph: ModelGraph, names: list[str], parts: int) -> list[int]:
    if len(names) != parts - 1:
        raise ConfigError(f"balance names {len(names)} cut-after layers but num_partitions={parts} needs {parts - 1}.")
    where = {c.name: c.index for c in graph.calls}
    starts = [0]
    for name in names:
        if name not in where:
            close = [k for k in where if name.lower() in k.lower()][:5]
            hint = f" Similar names: {close}." if close else ""
            raise ConfigError(
                f"balance names unknown layer '{name}'.{hint} Layer names are listed by print(hyparflow.plan(model, "
                "1))."
            )
        starts.append(where[name] + 1)
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= len(graph):
        raise ConfigError(
            f"balance={names}: cut-after layers must be in graph order and leave every stage at least one layer."
        )
    return starts


def _calibrated(graph: ModelGraph, starts: list[int], need: list[float], memory_limit: float | None) -> list[int]:
    """Cut again after scaling each stage's call costs to the stage's own compiled step,
    timed whole: TensorFlow fuses ops across the calls of one compiled function
    (convolution, normalization, activation), which calls timed alone cannot see."""
    bounds = list(zip(starts, starts[1:] + [len(graph.calls)]))
    for (a, b), seconds in zip(bounds, graph.span_times(bounds)):
        if seconds <= 0:  # no more than calling an empty function: nothing to scale to
            continue
        scale = seconds / sum(c.cost for c in graph.calls[a:b])
        for c in graph.calls[a:b]:
            c.cost *= scale
    return balanced_cuts([c.cost for c in graph.calls], len(starts), need, memory_limit, graph.uncuttable())


def recut(
    costs: Sequence[float],
    starts: Sequence[int],
    seconds: Sequence[float],
    memory: Sequence[float] | None = None,
    memory_limit: float | None = None,
    uncuttable: Collection[int] = (),
) -> tuple[list[int], float]:
    """New cuts from each stage's measured `seconds` per step under `starts`. A stage's
    calls cost what the profile said times the stage's own measured/profiled factor (how
    it runs: fused or apart, on its rank's threads); a call moved to another stage takes
    that stage's factor. Returns the cuts and the predicted seconds of their slowest stage."""
    n = len(costs)
    bounds = list(zip(starts, list(starts[1:]) + [n]))
    scales = [t / max(sum(costs[a:b]), 1e-30) for (a, b), t in zip(bounds, seconds)]
    found = scaled_cuts(costs, scales, np.array(_legal_starts(n, len(starts), uncuttable)), memory, memory_limit)
    ends = zip(found, found[1:] + [n])
    return found, max(k * sum(costs[a:b]) for k, (a, b) in zip(scales, ends))


def scaled_cuts(
    costs: Sequence[float],
    scales: Sequence[float],
    legal: np.ndarray,
    memory: Sequence[float] | None = None,
    memory_limit: float | None = None,
) -> list[int]:
    """Stage starts minimising the largest stage cost, stage k's being its calls' costs
    times `scales[k]`, starts only where `legal`, each stage's `memory` under
    `memory_limit`. Exact, by dynamic programming over (stage, end): O(stages x calls^2)."""
    n, parts = len(costs), len(scales)
    cost = np.concatenate([[0.0], np.cumsum(costs)])
    used = np.concatenate([[0.0], np.cumsum(memory if memory is not None else np.zeros(n))])
    cap = memory_limit if memory_limit is not None else math.inf
    best = np.full((parts, n + 1), math.inf)  # best[k, j]: calls [0, j) in stages 0..k
    start = np.zeros((parts, n + 1), int)
    best[0, 1:] = np.where(used[1:] <= cap, scales[0] * cost[1:], math.inf)
    for k in range(1, parts):
        for j in range(k + 1, n + 1):
            i = np.arange(k, j)
            value = np.maximum(best[k - 1, i], scales[k] * (cost[j] - cost[i]))
            value[~legal[i] | (used[j] - used[i] > cap)] = math.inf
            best[k, j], start[k, j] = value.min(), i[value.argmin()]
    if not math.isfinite(best[-1, n]):
        raise ConfigError(f"No split into {parts} stages keeps every stage under memory_limit={memory_limit}.")
    found, j = [], n
    for k in range(parts - 1, 0, -1):
        j = int(start[k, j])
        found.append(j)
    return [0] + found[::-1]


def _legal_starts(n: int, parts: int, uncuttable: Collection[int]) -> list[bool]:
    """Where a stage may start: after the first call, not at an `uncuttable` one, unless too
    few others are left for `parts` stages (the executor then checks what is sent)."""
    legal = [i > 0 and i not in uncuttable for i in range(n)]
    return legal if sum(legal) >= parts - 1 else [i > 0 for i in range(n)]


def balanced_cuts(
    costs: list[float],
    parts: int,
    memory: list[float] | None = None,
    memory_limit: float | None = None,
    uncuttable: Collection[int] = (),
) -> list[int]:
    """Stage start indices minimising the largest stage cost (contiguous stages), none in
    `uncuttable` unless too few others are left (the executor then checks what is sent).

    Exact up to float resolution: bisection on the bottleneck value, each probe a
    greedy feasibility test (furthest legal cut under both the cost and the memory
    bound), which is optimal for contiguous partitions of positive weights.
    """
    n = len(costs)
    if parts > n:
        raise ConfigError(f"Cannot split {n} layer calls into {parts} stages; use at most {n} partitions.")
    mem = memory if memory is not None else [0.0] * n
    cap = memory_limit if memory_limit is not None else math.inf
    if max(mem) > cap:
        raise ConfigError(
            f"memory_limit={memory_limit:.0f} bytes is below the largest single layer's estimate ({max(mem):.0f} "
            "bytes).",
        )

    legal = _legal_starts(n, parts, uncuttable)

    def greedy(limit: float) -> list[int] | None:
        starts, acc, used = [0], 0.0, 0.0
        for i, (c, m) in enumerate(zip(costs, mem)):
            if i > starts[-1] and (acc + c > limit or used + m > cap):
                cut = next((j for j in range(i, starts[-1], -1) if legal[j]), None)
                if cut is None:
                    return None
                starts.append(cut)
                acc, used = sum(costs[cut:i]), sum(mem[cut:i])
                if acc + c > limit or used + m > cap:
                    return None
            if c > limit:
                return None
            acc, used = acc + c, used + m
        return starts if len(starts) <= parts else None

    lo, hi = max(costs), sum(costs)
    if greedy(hi) is None:
        limit = f"memory_limit={memory_limit:.0f} bytes"
        raise ConfigError(
            f"No split into {parts} stages keeps every stage under {limit}; use more partitions or a higher limit."
        )
    for _ in range(100):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        if greedy(mid) is None:
            lo = mid
        else:
            hi = mid
    found = greedy(hi)
    assert found is not None, "greedy(hi) succeeded before the bisection and hi only shrinks to feasible values"
    starts = found
    # Fewer stages than asked: split the costliest multi-call stages (never raises the max).
    while len(starts) < parts:
        bounds = starts + [n]
        splittable = [k for k in range(len(starts)) if any(legal[bounds[k] + 1 : bounds[k + 1]])]
        _, k = max((sum(costs[bounds[k] : bounds[k + 1]]), k) for k in splittable)
        a, b = bounds[k], bounds[k + 1]
        half, acc, cut = sum(costs[a:b]) / 2, 0.0, a + 1
        for i in range(a, b - 1):
            acc += costs[i]
            if legal[i + 1]:
                cut = i + 1
                if acc >= half:
                    break
        starts = sorted(starts + [cut])
    return starts
