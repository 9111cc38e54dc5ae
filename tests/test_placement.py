"""Placement policy on synthetic node layouts (no real nodes needed), and thread shares."""

from __future__ import annotations

import pytest

from hyparflow.errors import ConfigError
from hyparflow.placement import Slot, assign, describe, own_cores, split_cores


def layout(nodes: int, per_node: int, cores: int = 16, interleaved: bool = False) -> list[Slot]:
    """Ranks on nodes; `interleaved` numbers ranks round-robin over nodes (mpirun --map-by node)."""
    slots = []
    for rank in range(nodes * per_node):
        node, local = (rank % nodes, rank // nodes) if interleaved else divmod(rank, per_node)
        slots.append(Slot(rank, node, f"node{node}", local, split_cores(cores, per_node, local)))
    return slots


def grid(slots, assignment):
    by = {}
    for s, (rep, st) in zip(slots, assignment):
        by.setdefault(rep, {})[st] = s
    return by


@pytest.mark.parametrize("nodes, per_node, P", [(4, 8, 4), (4, 8, 8), (4, 8, 2), (2, 4, 4), (3, 6, 3), (8, 4, 2)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_replica_stages_share_a_node_when_they_fit(nodes, per_node, P, interleaved):
    slots = layout(nodes, per_node, interleaved=interleaved)
    R = len(slots) // P
    assignment = assign(slots, P, R)
    assert sorted(assignment) == sorted((r, s) for r in range(R) for s in range(P))
    for rep, stages in grid(slots, assignment).items():
        assert len({s.node for s in stages.values()}) == 1, f"replica {rep} spans nodes"


def test_replica_spans_the_fewest_nodes_when_it_does_not_fit():
    slots = layout(4, 4)
    assignment = assign(slots, 8, 2)
    for stages in grid(slots, assignment).values():
        assert len({s.node for s in stages.values()}) == 2


def test_replica_policy_puts_a_stage_replicas_together():
    slots = layout(4, 8)
    assignment = assign(slots, 4, 8, policy="replica")
    for st in range(4):
        nodes = {s.node for s, (rep, stage) in zip(slots, assignment) if stage == st}
        assert len(nodes) == 1, f"stage {st}'s 8 replicas fill one 8-rank node"


@pytest.mark.parametrize("cores, ranks", [(16, 8), (16, 3), (2, 4), (32, 5), (48, 48), (7, 2)])
def test_core_shares_are_disjoint_and_add_up(cores, ranks):
    shares = [split_cores(cores, ranks, i) for i in range(ranks)]
    if ranks <= cores:
        flat = [c for s in shares for c in s]
        assert sorted(flat) == list(range(cores)), "every core used exactly once"
        assert sum(len(s) for s in shares) == cores  # threads per rank multiply out to the node
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    else:
        assert all(len(s) == 1 for s in shares)  # oversubscribed: one thread each


def test_the_rank_map_shows_the_cores_a_rank_is_bound_to():
    """mpirun -np 2 binds rank 1 to core 1: the map said 0 for both (each saw one core)."""
    assert [own_cores({r}, 2, 2, r) for r in range(2)] == [(0,), (1,)]
    assert own_cores({4, 5, 6, 7}, 8, 2, 1) == (4, 5, 6, 7)  # a launcher's 4-core slot
    assert [own_cores(range(4), 4, 2, r) for r in range(2)] == [(0, 1), (2, 3)]  # unbound: its thread share
    text = describe([Slot(0, 0, "h", 0, (0, 1, 2, 3)), Slot(1, 0, "h", 1, (2, 3, 6, 7))], [(0, 0), (0, 1)])
    assert [line.split()[3] for line in text.splitlines()[1:]] == ["0-3", "2,3,6,7"]


def test_world_size_must_be_the_grid():
    with pytest.raises(ConfigError, match=r"has 6 ranks but num_partitions x num_replicas = 4 x 2 = 8"):
        assign(layout(2, 3), 4, 2)


def test_unknown_policy():
    with pytest.raises(ConfigError, match="policy 'zigzag'"):
        assign(layout(1, 4), 2, 2, policy="zigzag")
