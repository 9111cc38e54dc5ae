"""Which ranks read the data, and how the others learn each step's batch size.

A stage reads when it consumes model inputs, or (when the call has targets) computes a
model output's loss from targets and sample weights. Only reading ranks iterate a stream
(tf.data, PyDataset, generator); a stage that reads nothing (a middle stage of a pipeline)
needs only each global batch's size, which sets its micro-batch sizes. Its replica's lowest
reading stage, the leader, sends it that size in a one-number message as it pulls each
batch, and a zero when the stream ends (so a stream of unknown length ends on the same step
everywhere). Before the first step, the lowest reading world rank shares the stream's step
count, the first batch's shapes and a two-sample slice of it (for the loss and metric set-up)
with every rank, once per source. Without non-reading stages none of this happens. With a
per-replica stream (`hyparflow.replicas`) each replica reads its own stream: the leader sends
every replica's batch size, the readers agree on those among themselves, and all readers share
their stream's set-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hyparflow.errors import ConfigError
from hyparflow.transport import Transport

SIZE_TAG = 30_200  # pipe tag of the batch-size messages (the executor's tags are small even numbers and their +1)


@dataclass(frozen=True)
class Feed:
    """This rank's part in reading the data for one call."""

    transport: Transport
    reads: bool  # this rank iterates streams
    leader: int  # the lowest reading pipeline position of this replica: it sends batch sizes to `followers`
    followers: tuple[int, ...]  # pipeline positions of this replica whose stages read nothing
    root: int  # the lowest reading world rank: it shares a stream's first batch when anyone follows
    anyone_follows: bool  # whether any replica has a stage that reads nothing
    replicas: int = 1
    replica: int = 0
    divisors: Callable[[Any], np.ndarray] | None = None  # a batch's share of the loss divisors (`replicas`)

    @classmethod
    def of(cls, session, with_targets: bool) -> Feed:
        """The roles for a call on `session` that reads targets or not (predict does not)."""
        stages = session.plan.stages
        reading = [bool(st.data_inputs) or (with_targets and bool(st.model_outputs)) for st in stages]
        if not any(reading):
            raise ConfigError("No stage reads the model's inputs: the plan has nothing to feed.")
        grid = session.grid
        at = [any(reading[s] for s in grid.stages_at(p)) for p in range(grid.num_partitions)]  # by position
        world_readers = [rank for row in grid.ranks for p, rank in enumerate(row) if at[p]]
        return cls(
            transport=session.transport,
            reads=at[grid.stage],
            leader=at.index(True),
            followers=tuple(p for p, r in enumerate(at) if not r),
            root=min(world_readers),
            anyone_follows=not all(at),
            replicas=grid.num_replicas,
            replica=grid.replica,
            divisors=session.replica_divisors,
        )

    @property
    def leads(self) -> bool:
        return self.reads and self.transport.grid is not None and self.transport.grid.stage == self.leader

    def share(self, info: Any) -> Any:
        """`info` as computed on the root reader, on every rank; unchanged when no rank follows."""
        return self.transport.bcast(info, root=self.root) if self.anyone_follows else info

    def announce(self, sizes) -> None:
        """Leader: tell this replica's followers the next global batch's size, or each
        replica's share of it for a per-replica stream (zeros: the end)."""
        if not self.followers or not self.leads:
            return
        message = np.array(sizes, np.int64).reshape(-1)
        requests = [self.transport.isend(message, s, SIZE_TAG) for s in self.followers]
        self.transport.wait(requests, "batch sizes to stages that read no data")

    def next_sizes(self, width: int = 1) -> np.ndarray:
        """Follower: the `width` sizes of the leader's next `announce` (zeros: the stream ended)."""
        message = np.zeros(width, np.int64)
        self.transport.wait(
            [self.transport.irecv(message, self.leader, SIZE_TAG)], "the next batch's size", stage=self.leader
        )
        return message
