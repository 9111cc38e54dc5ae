"""The real engine (stages, schedule, executor, reducer) on 4 loopback ranks in one
process: the equivalence cases of tests/cases.py, and the loopback transport itself."""

from __future__ import annotations

import cases
import numpy as np
import pytest

from hyparflow import loopback


def run_case(key: str):
    spec = cases.CASES[key]
    models = [cases.compiled(spec[0], spec[4]) for _ in range(4)]  # built here: seeding is global
    histories = loopback.run(4, lambda comm: cases.fit(models[comm.Get_rank()], key, comm))
    return models, histories


@pytest.mark.parametrize("key", list(cases.CASES))
def test_weights_equal_plain_keras(key):
    models, histories = run_case(key)
    r = cases.compare(key, models[0], histories[0])
    assert r["moved"] > 1e-3, "training did not change the weights"
    assert r["err"] < 1e-4, f"max relative weight difference {r['err']:.2e}"
    for key_ in r["ref_history"]:
        assert r["history"][key_] == pytest.approx(r["ref_history"][key_], rel=1e-5, abs=1e-6), key_
    for h in histories[1:]:
        assert h.history == histories[0].history, "every rank reports the same logs"


def test_collectives_reduce_in_rank_order_and_messages_match_in_posting_order():
    def body(comm):
        me = comm.Get_rank()
        out = np.empty(3)
        comm.Iallreduce(np.full(3, me + 1.0), out).Wait()
        bufs = [np.empty(2) for _ in range(3)]
        reqs = [comm.Irecv(b, source=(me - 1) % 3, tag=7) for b in bufs]
        for k in range(3):
            comm.Isend(np.full(2, 10.0 * me + k), dest=(me + 1) % 3, tag=7)
        for req in reversed(reqs):
            req.Wait()
        return out.tolist(), [b[0] for b in bufs], comm.allgather(me), comm.bcast(me * 5, root=2)

    for me, (total, got, gathered, value) in enumerate(loopback.run(3, body)):
        assert total == [6.0, 6.0, 6.0]
        assert got == [10.0 * ((me - 1) % 3) + k for k in range(3)]
        assert gathered == [0, 1, 2] and value == 10


def test_a_failing_rank_fails_the_world_instead_of_hanging():
    def body(comm):
        if comm.Get_rank() == 1:
            raise ValueError("boom on rank 1")
        comm.allgather(0)  # rank 1 never arrives

    with pytest.raises(RuntimeError, match="loopback rank 1 failed: ValueError: boom on rank 1"):
        loopback.run(3, body)
