"""Re-cutting from the stages' measured times (`hyparflow.rebalance`): the decision as a
pure function, and moved cuts on the real engine, which must leave training unchanged."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from training import max_rel

import hyparflow as hf
from hyparflow import loopback, rebalance
from hyparflow.partition import recut
from hyparflow.session import Session


def test_recut_moves_calls_off_the_stage_measured_slow():
    """Stage 0 measured at 1.5x its profile and stage 1 at 1x: calls move to stage 1, and
    a call keeps the factor of the stage it lands on."""
    costs, starts = [1.0] * 10, [0, 5]
    found, predicted = recut(costs, starts, [7.5, 5.0])
    assert found == [0, 4] and predicted == pytest.approx(6.0)  # 4 x 1.5 = 6 against 6 x 1
    assert recut(costs, starts, [5.0, 5.0]) == ([0, 5], pytest.approx(5.0))


def test_cuts_move_only_where_the_saving_pays_for_the_move():
    costs, starts, seconds = [1.0] * 10, [0, 5], [0.75, 0.5]  # saves 0.15 s a step
    assert rebalance.decide(costs, starts, seconds, trace=2.0, steps=100) == [0, 4]
    assert rebalance.decide(costs, starts, seconds, trace=20.0, steps=100) is None  # the trace costs more
    assert rebalance.decide(costs, starts, [0.51, 0.5], trace=0.0, steps=10**6) is None  # within the noise
    assert rebalance.decide(costs, [0, 4, 7], [0.6, 0.45, 0.45], trace=0.0, steps=10**6) is None  # balanced


def _build() -> keras.Model:
    """Statistics and random draws that a step that updates nothing must put back."""
    keras.utils.set_random_seed(5)
    x = inp = keras.Input((12,))
    for width in (32, 24, 16):
        x = keras.layers.Dense(width, activation="relu")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Dropout(0.2, seed=width)(x)
    model = keras.Model(inp, keras.layers.Dense(3)(x))
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _fit(monkeypatch, move: bool, schedule: str) -> tuple[list[np.ndarray], list[list[int]]]:
    """P=2 x R=2, M=2 on loopback ranks: weights after 32 steps, and the cuts each recut moved to."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(256, 12)).astype("float32"), rng.integers(0, 3, 256)
    moves: list[list[int]] = []
    real_recut = Session.recut

    def counted(session, starts, hint):
        moves.append(list(starts))
        real_recut(session, starts, hint)

    monkeypatch.setattr(Session, "recut", counted)
    if move:  # rank 0's first decision moves the cut by a call, whatever it measured
        monkeypatch.setattr(
            rebalance, "decide", lambda costs, starts, *_: None if moves else [0, starts[1] + 1, *starts[2:]]
        )
    else:
        monkeypatch.setattr(rebalance, "eligible", lambda *_: False)
    models = [_build() for _ in range(4)]
    fit = dict(batch_size=8, num_partitions=2, num_microbatches=2, shuffle=False, verbose=0, balance="time")
    fit["schedule"] = schedule
    loopback.run(4, lambda comm: hf.fit(models[comm.Get_rank()], x, y, comm=comm, **fit))
    return models[0].get_weights(), moves


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_moved_cuts_train_as_the_cuts_planned(monkeypatch, schedule):
    """Cuts moved after the timed steps (and possibly back) give the weights, BatchNorm
    statistics included, of a fit that never timed or moved them (interleaved: 4 stages
    on 2 ranks a replica)."""
    moved, moves = _fit(monkeypatch, move=True, schedule=schedule)
    assert moves, "the cuts never moved"
    assert len(moves[0]) == (4 if schedule == "interleaved" else 2)
    monkeypatch.undo()
    still, none = _fit(monkeypatch, move=False, schedule=schedule)
    assert not none
    assert max_rel(moved, still) < 1e-5
