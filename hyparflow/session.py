"""A session: one model planned and placed on the job's ranks, ready to run steps.

Opening one waits (boundedly) until every rank arrived, checks that every rank has the
same model, plans it on rank 0 (a "time" balance measures, which differs between ranks)
for all to follow, places replicas x stages on the ranks, and forms the grid's groups.
`close()` frees them.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import numpy as np

from hyparflow import keras_compat, memory, placement
from hyparflow.checkpoint import gather_stages, release_other_stages, scatter_stages
from hyparflow.errors import ConfigError
from hyparflow.executor import Executor
from hyparflow.failures import phase, state
from hyparflow.graph import ModelGraph
from hyparflow.inputs import Data
from hyparflow.objective import Objective
from hyparflow.partition import Plan
from hyparflow.partition import plan as make_plan
from hyparflow.settings import Layout
from hyparflow.stage import MicroBatch, StageCompute, StepNorm
from hyparflow.timeline import Timeline, now
from hyparflow.transport import Transport

log = logging.getLogger("hyparflow")


class _ModelSessions:
    """The newest session of each model, reused by the next call with the same layout and
    compilation (its plan, groups and compiled stage functions), as Keras reuses its
    compiled train function. Kept on the model itself: a session holds its model's layers
    and variables, so a table beside the models would keep every model ever trained alive,
    while a model and its session form a cycle that the garbage collector frees together."""

    _ATTR = "_hyparflow_session"

    def get(self, model) -> tuple[tuple, Session] | None:
        return model.__dict__.get(self._ATTR)

    def __getitem__(self, model) -> tuple[tuple, Session]:
        return model.__dict__[self._ATTR]

    def __setitem__(self, model, entry: tuple[tuple, Session]) -> None:
        object.__setattr__(model, self._ATTR, entry)  # past Keras's attribute tracking

    def __delitem__(self, model) -> None:
        del model.__dict__[self._ATTR]


_SESSIONS = _ModelSessions()


def open_session(
    model,
    comm,
    layout_kw: dict[str, Any],
    balance=None,
    memory_limit=None,
    announce: bool = False,
    batch_size: int | None = None,
) -> Session:
    """The model's cached session if every rank has one for this layout and compilation,
    else a new one (the old one is closed). Starts with the bounded rendezvous. A new
    session's "time" balance is measured at the micro-batch size of `batch_size` (the
    global batch; Keras's default 32 when the data sets it)."""
    world = Transport(comm)
    layout = Layout.resolve(world.size, **layout_kw)
    key = (id(world.world), layout, repr(balance), memory_limit, keras_compat.compile_identity(model))
    cached = _SESSIONS.get(model)
    session = cached[1] if cached is not None and cached[0] == key else None
    reusable = session is not None
    transport = session.transport if session is not None else world
    with phase("start-up"):
        transport.rendezvous("the start of a hyparflow call")
        everyone = all(transport.allgather(reusable))
    if cached is not None:
        cached[1].collect()
    if everyone and session is not None:
        state.where = session.grid.where()
        return session
    if cached is not None:
        cached[1].close()
        del _SESSIONS[model]
    memory.restore_zeros(model)  # planning runs the model; the start-up broadcast fills these
    micro = -(-(batch_size or 32) // (layout.num_replicas * layout.num_microbatches))
    session = Session(model, layout, balance, memory_limit, world, announce, micro)
    _SESSIONS[model] = (key, session)
    return session


class Session:
    def __init__(
        self,
        model,
        layout: Layout,
        balance,
        memory_limit,
        transport: Transport,
        announce: bool,
        microbatch_size: int,
    ):
        self.model, self.layout, self.transport = model, layout, transport
        self.P, self.R, self.M = layout.num_partitions, layout.num_replicas, layout.num_microbatches
        if memory_limit is not None and layout.virtual_stages > 1:
            raise ConfigError(
                "memory_limit bounds one stage a rank; under schedule='interleaved' a rank holds "
                f"{layout.virtual_stages}: plan with balance=... instead, or use schedule='1f1b'."
            )
        state.where = ""
        with phase("plan"):
            graph = ModelGraph(model)
            self.check_same_everywhere(
                "model",
                graph.fingerprint,
                "every rank must build the same model (same layers, connections and weight shapes).",
            )
            planned: Plan | ConfigError | None = None
            if transport.rank == 0:
                try:
                    planned = make_plan(model, layout.num_stages, balance, memory_limit, microbatch_size)
                except ConfigError as e:
                    planned = e
            found = transport.bcast((planned.starts, planned.balance) if isinstance(planned, Plan) else planned)
            if isinstance(found, ConfigError):
                raise ConfigError(str(found))
            self.plan = Plan(graph, found[0], found[1])
            if isinstance(planned, Plan):  # rank 0 keeps the cost model, for `rebalance`
                self.plan.call_costs, self.plan.call_memory = planned.call_costs, planned.call_memory
            self.memory_limit = memory_limit
            self.check_same_everywhere("plan", self.plan.fingerprint)
        with phase("placement"):
            slots = placement.discover(transport)
            assignment = placement.assign(slots, self.P, self.R, layout.placement)
            tied = [tuple(s) for _, s in self.plan.tied]
            self.grid = transport.form_grid(assignment, self.P, self.R, tied, layout.virtual_stages)
            state.where = self.grid.where()
            if announce and transport.rank == 0:
                rank_map = placement.describe(slots, assignment, self.grid.stages_at)
                log.info("rank map (P=%d x R=%d, M=%d, %s):\n%s", self.P, self.R, self.M, layout.schedule, rank_map)
        self.stage = self.plan.held(self.grid.stages)
        self.executor: Executor | None = None
        self.objective: Objective | None = None
        self.with_targets = False
        self.timeline: Timeline | None = None  # recording `fit`'s timeline, when asked to
        self.spread = False  # True after a gather="none" fit: each stage's weights only on its ranks
        self.rebalanced = False  # True once a fit timed the cuts (`hyparflow.rebalance`)

    @property
    def compute(self) -> StageCompute:
        return self.executor_or_fail().compute

    def executor_or_fail(self) -> Executor:
        if self.executor is None:
            raise RuntimeError("the session's stage is not built: call start() first")
        return self.executor

    def collect(self) -> None:
        """Bring weights that a `gather="none"` fit left on their stages back to rank 0,
        where every call takes them from."""
        if self.spread:
            gather_stages(self.plan, self.transport)
            self.spread = False

    def close(self) -> None:
        self.transport.close()

    def check_same_everywhere(self, what: str, value: str, hint: str = "") -> None:
        """Raise the same ConfigError on every rank unless all ranks pass the same value."""
        values = self.transport.allgather(value)
        if len(set(values)) > 1:
            odd = [r for r, v in enumerate(values) if v != values[0]]
            hint = hint or "every rank must call hyparflow with the same model, data and settings."
            raise ConfigError(f"The {what} differs between ranks (ranks {odd} differ from rank 0): {hint}")

    def start(self, data: Data, need_loss: bool = True, release: str | None = None) -> Executor:
        """Resolve the compiled loss and metrics against a sample batch; build the stage
        (once: a later call reuses it unless it now needs the targets an earlier did not).
        With `release` (the error a later use names), ranks but rank 0 release the other
        stages' variables once the objective has run the whole model (to find its masks)
        and before the stage's accumulators are made, so those reuse the memory."""
        with_targets = any(y is not None for y in data.y)
        build = self.executor is None or (with_targets and not self.with_targets)
        if build:
            self.with_targets = with_targets
            graph = self.plan.graph
            specs = [graph.tensors[t].ref for t in graph.output_tensors]
            x_sample = [x[:2] for x in data.x]
            y_sample = [None if y is None else y[:2] for y in data.y]
            self.objective = Objective(self.model, graph.output_names, x_sample, y_sample, specs, need_loss)
        if release is not None and self.transport.rank != 0:
            release_other_stages(self.plan, self.transport, release)
        if build:
            self._build_stage()
        assert self.executor is not None
        return self.executor

    def _build_stage(self) -> None:
        optimizer = getattr(self.model, "optimizer", None)  # none: predict on an uncompiled model
        assert self.objective is not None
        compute = StageCompute(self.plan, self.grid.stages, self.objective, optimizer)
        self.executor = Executor(compute, self.transport, self.layout.schedule)

    def recut(self, starts: list[int], hint: str | None) -> None:
        """Move the cuts to `starts` before the first update (`hyparflow.rebalance`): rank 0
        gathers every stage's variables, each rank builds its new stage, and rank 0 scatters
        them as at the start (`hint`: as `start`'s `release`). The old stage's accumulators
        are freed before rank 0 holds the whole model again."""
        recompute = self.compute.recompute
        self.executor = None
        gc.collect()
        gather_stages(self.plan, self.transport)
        old = self.plan
        self.plan = Plan(old.graph, starts, old.balance)
        self.plan.call_costs, self.plan.call_memory = old.call_costs, old.call_memory
        self.check_same_everywhere("plan", self.plan.fingerprint)
        self.stage = self.plan.held(self.grid.stages)
        if hint is not None and self.transport.rank != 0:
            release_other_stages(self.plan, self.transport, hint)
        self._build_stage()
        self.compute.recompute = recompute
        scatter_stages(self.plan, self.transport, hint, release_root=True)

    # ---- batches -------------------------------------------------------------------
    def split(self, idx: np.ndarray) -> list[np.ndarray]:
        """This rank's micro-batches of a global batch: its replica's share, cut in up to M."""
        return self._cut(np.array_split(idx, self.R)[self.grid.replica])

    def _cut(self, share: np.ndarray) -> list[np.ndarray]:
        return np.array_split(share, min(self.M, len(share))) if len(share) else []

    def micro_batches(self, data: Data, idx: np.ndarray) -> tuple[list[MicroBatch], StepNorm]:
        """This rank's micro-batches of global batch `idx`, and the step's normalisers. A
        batch of a per-replica stream (`data.shares`) holds this replica's rows only."""
        if self.objective is None:
            raise RuntimeError("the session's objective is not built: call start() first")
        timeline = self.timeline
        t0 = now() if timeline is not None else 0.0
        st = self.stage
        if data.shares is None:
            shares = np.array_split(idx, self.R)
            own, sizes = shares[self.grid.replica], [len(s) for s in shares]
            divisors = self.objective.divisors(data.x, data.y, data.sw, idx, st.model_outputs)
        else:
            sizes, divisors = data.shares.sizes.tolist(), data.shares.divisors
            own = np.arange(sizes[self.grid.replica])
        micro = [
            MicroBatch(
                size=len(p),
                inputs=[data.x[i][p] for i in st.data_inputs],
                targets=[np.zeros(len(p), np.float32) if (y := data.y[o]) is None else y[p] for o in st.model_outputs],
                weights=[None if (w := data.sw[o]) is None else w[p] for o in st.model_outputs],
            )
            for p in self._cut(own)
        ]
        total_micro = sum(min(self.M, n) for n in sizes)
        if timeline is not None:
            timeline.add("prepare micro-batches", "data", t0)
        return micro, StepNorm(divisors, 1.0 / max(total_micro, 1), len(idx))

    def replica_divisors(self, data: Data) -> np.ndarray:
        """A replica's batch's part of the global batch's loss divisors (they add up over the
        replicas); NaN for the outputs whose divisor this stage does not count."""
        assert self.objective is not None
        return self.objective.divisors(
            data.x, data.y, data.sw, np.arange(len(data)), self.stage.model_outputs, fill=np.nan
        )
