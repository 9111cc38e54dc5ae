"""The partition plan: contiguous stages of a model graph, their boundary tensors,
and stage callables that share the original layers and variables.

Skip connections that jump over stages are sent directly from the producing stage to
every stage that consumes them (and their gradients straight back), never forwarded
through the stages in between. Model inputs are read by each stage that uses them
from its own copy of the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hyparflow import keras_compat
from hyparflow.errors import ConfigError
from hyparflow.graph import COST_MODELS, TIME_PROFILE_MAX_CALLS, LayerCall, ModelGraph, TensorInfo, balanced_cuts, run_call

# Estimated bytes held per parameter byte: weights, gradients and two optimizer slots.
STATE_BYTES_PER_PARAM_BYTE = 4


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

    @property
    def layers(self) -> list[str]:
        return [c.name for c in self.calls]

    @property
    def cost(self) -> float:
        return sum(c.cost for c in self.calls)

    @property
    def param_bytes(self) -> int:
        return sum(c.param_bytes for c in self.calls)

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
        return list({id(c.layer): c.layer for c in self.calls}.values())

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
        """Weight regularizer losses: they depend on the weights only, not on the batch."""
        return [loss for layer in self.unique_layers for loss in keras_compat.regularization_losses(layer)]

    @property
    def call_losses(self) -> list[Any]:
        """Losses added during the last forward (activity regularizers, `add_loss` in call):
        computed on that batch, so they add up over micro-batches."""
        return [loss for layer in self.unique_layers for loss in keras_compat.own_call_losses(layer)]

    def forward(self, feeds: dict[int, Any], training: bool) -> dict[int, Any]:
        """Run the stage. `feeds` maps tensor index -> value for its received boundary
        tensors and its model inputs; returns values for every tensor it sends and every
        model output it produces."""
        values = dict(feeds)
        for call in self.calls:
            values.update(run_call(call, values, self.tensors, training))
        wanted = [t for t, _ in self.send] + self.output_tensors
        return {t: values[t] for t in wanted}


def _unique_vars(variables) -> list[Any]:
    return list({id(v): v for v in variables}.values())


class Plan:
    """A model split into `num_partitions` stages; `print(plan)` shows the table."""

    def __init__(self, graph: ModelGraph, starts: Sequence[int], balance: str):
        self.graph = graph
        self.balance = balance
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
        for t in graph.tensors:
            if t.producer < 0:
                for s in sorted({stage_of[c] for c in t.consumers}):
                    self.stages[s].data_inputs.append(t.model_input)
                continue
            src = stage_of[t.producer]
            for dst in sorted({stage_of[c] for c in t.consumers} - {src}):
                self.stages[src].send.append((t.index, dst))
                self.stages[dst].recv.append(t.index)
        for pos, t in enumerate(graph.output_tensors):
            producer = graph.tensors[t].producer
            if producer < 0:
                raise ConfigError(
                    f"Model output '{graph.output_names[pos]}' is a model input passed straight through; hyparflow needs every output produced by a layer."
                )
            stage = self.stages[stage_of[producer]]
            stage.model_outputs.append(pos)
            stage.output_tensors.append(t)
        for st in self.stages:
            st.data_inputs.sort()
        for t in self.boundary:
            info = graph.tensors[t]
            if any(d is None for d in info.shape):
                raise ConfigError(
                    f"Boundary tensor '{info.name}' has shape {info.shape} with unknown dimensions, which cannot be sent "
                    "between stages; give the model's Input layers full shapes, or choose cuts (balance=[...]) that avoid it."
                )

    @property
    def boundary(self) -> list[int]:
        """Tensors that cross a stage boundary, in a fixed order (their message tags)."""
        return sorted({t for st in self.stages for t, _ in st.send})

    @property
    def num_partitions(self) -> int:
        return len(self.stages)

    @property
    def fingerprint(self) -> str:
        """Identifies the graph's structure, its weights' shapes and the cuts (not the
        layers' names, which Keras numbers per process); equal on every rank."""
        h = hashlib.sha256(self.graph.fingerprint.encode())
        h.update(str(self.starts).encode())
        return h.hexdigest()[:16]

    def forward(self, inputs: Sequence[Any], training: bool = False) -> list[Any]:
        """Run the stages one after another in this process; returns the model outputs.
        A reference for tests and debugging: the result must equal `model(inputs)`."""
        values = {self.graph.tensors[i].index: x for i, x in enumerate(inputs)}
        for st in self.stages:
            feeds = {t: values[t] for t in st.recv}
            feeds.update({i: values[i] for i in st.data_inputs})
            values.update(st.forward(feeds, training))
        return [values[t] for t in self.graph.output_tensors]

    def __str__(self) -> str:
        rows = [f"Plan: {len(self.graph)} layer calls in {self.num_partitions} stages (balance={self.balance})"]
        head = f"{'stage':>5} {'layers':>6}  {'first .. last':<40} {'cost':>10} {'params':>10}  in / out"
        rows += [head, "-" * len(head)]
        total = sum(s.cost for s in self.stages) or 1.0
        for s in self.stages:
            span = f"{s.layers[0]} .. {s.layers[-1]}"
            ins = ", ".join(f"{t.name}{list(t.shape)}" for t in s.inputs) or "-"
            outs = ", ".join(f"{self.graph.tensors[t].name}->{d}" for t, d in s.send) or "-"
            if s.model_outputs:
                outs += " | outputs: " + ", ".join(self.graph.output_names[i] for i in s.model_outputs)
            rows.append(f"{s.index:>5} {len(s.calls):>6}  {span[:40]:<40} {100 * s.cost / total:>9.1f}% {_human(s.param_bytes):>10}  {ins} / {outs}")
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
    microbatch_size: int = 1,
) -> Plan:
    """Split `model` into `num_partitions` contiguous stages.

    balance: a cost model ("time": measured forward+backward per layer, "flops",
      "params"; default "time" for up to 100 layer calls, else "flops"), a list of
      layer-call counts per stage, or a list of layer names to cut after.
    memory_limit: bytes per stage for weights, gradients, optimizer slots and
      `microbatch_size` samples of activations.
    """
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError(f"num_partitions must be a positive integer, got {num_partitions!r}.")
    graph = ModelGraph(model)
    n = len(graph)
    if num_partitions > n:
        raise ConfigError(f"num_partitions={num_partitions} exceeds the {n} layer calls of model '{model.name}'; use at most {n}.")
    if balance is None:
        balance = "time" if n <= TIME_PROFILE_MAX_CALLS else "flops"
    if isinstance(balance, str):
        graph.set_costs(balance)
        memory = [c.param_bytes * STATE_BYTES_PER_PARAM_BYTE + c.act_bytes * microbatch_size for c in graph.calls]
        starts = balanced_cuts([c.cost for c in graph.calls], graph.cuttable, num_partitions, memory, memory_limit)
        return Plan(graph, starts, balance)
    graph.set_costs("flops")
    balance = list(balance)
    if all(isinstance(b, int) for b in balance):
        starts = _starts_from_counts(graph, balance, num_partitions)
    elif all(isinstance(b, str) for b in balance):
        starts = _starts_from_names(graph, balance, num_partitions)
    else:
        raise ConfigError(f"balance={balance!r}: a list must hold only layer counts (int) or only layer names (str); cost models are {COST_MODELS}.")
    for s in starts[1:]:
        if not graph.cuttable[s - 1]:
            raise ConfigError(
                f"A stage boundary after '{graph.calls[s - 1].name}' would split the calls of a shared layer "
                "across stages; move the cut so that every call of a shared layer is in one stage."
            )
    return Plan(graph, starts, "explicit")


def _starts_from_counts(graph: ModelGraph, counts: list[int], parts: int) -> list[int]:
    n = len(graph)
    if len(counts) != parts:
        raise ConfigError(f"balance gives {len(counts)} layer counts but num_partitions={parts}; give one count per stage.")
    if any(c < 1 for c in counts):
        raise ConfigError(f"balance={counts}: every stage needs at least one layer call.")
    if sum(counts) != n:
        raise ConfigError(f"balance={counts} sums to {sum(counts)} but model '{graph.model.name}' has {n} layer calls (hyparflow.plan(model, 1) lists them).")
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
            raise ConfigError(f"balance names unknown layer '{name}'.{hint} Layer names are listed by print(hyparflow.plan(model, 1)).")
        starts.append(where[name] + 1)
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= len(graph):
        raise ConfigError(f"balance={names}: cut-after layers must be in graph order and leave every stage at least one layer.")
    return starts
