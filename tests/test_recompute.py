"""Activation recomputation (`fit(recompute=True)`) on loopback ranks: the same weights,
BatchNorm statistics, seed states and logs as without it, and as plain Keras."""

from __future__ import annotations

import cases
import numpy as np
import pytest
import zoo

import hyparflow as hf
from hyparflow import cli, loopback, session
from hyparflow.errors import ConfigError
from hyparflow.settings import switch


def train(P: int, M: int, schedule: str, recompute: bool):
    """hf.fit of the Dropout + BatchNorm model on P loopback ranks, two steps; returns rank 0's
    model, history, and how often its stage traced the recomputing backward."""
    models = [cases.compiled("dropout_bn", "adam") for _ in range(P)]
    x, y = zoo.sample_inputs(models[0], 32)[0], zoo.sample_targets(models[0], 32)[0]
    kw = dict(batch_size=16, epochs=1, shuffle=False, verbose=0, balance="flops", gather="all")
    histories = loopback.run(
        P,
        lambda comm: hf.fit(
            models[comm.Get_rank()],
            x,
            y,
            num_partitions=P,
            num_microbatches=M,
            schedule=schedule,
            recompute=recompute,
            comm=comm,
            **kw,
        ),
    )
    compute = session._SESSIONS[models[0]][1].compute
    return models[0], histories[0], x, y, compute.recomputed.experimental_get_tracing_count()


def state(model) -> dict[str, np.ndarray]:
    """What a training forward changes: BatchNorm statistics and dropout seed states."""
    return {v.path: v.numpy() for v in model.variables if not v.trainable}


def assert_same(model, ref, tol: float = 0.0) -> None:
    """Equal weights and state: to the bit (tol=0), or to `tol` where the two ran different kernels."""
    for a, b in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    ours, theirs = state(model), state(ref)
    assert any("seed" in k for k in ours) and any("moving_mean" in k for k in ours)
    for (k, a), b in zip(ours.items(), theirs.values()):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=k)


def test_recompute_equals_plain_keras_with_dropout_and_batchnorm():
    """One micro-batch, so Keras draws the same masks and statistics: equal to float tolerance
    (oneDNN may pick other kernels for a stage's shapes than for the whole model's)."""
    model, history, x, y, traced = train(2, 1, "1f1b", True)
    assert traced > 0, "stage 0 never recomputed its forward"
    ref = cases.compiled("dropout_bn", "adam")
    href = ref.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    assert_same(model, ref, tol=1e-5)
    assert history.history["loss"] == pytest.approx(href.history["loss"], rel=1e-5)
    assert history.history["accuracy"] == pytest.approx(href.history["accuracy"])


def test_recompute_between_later_forwards_changes_nothing():
    """P=2, M=4, GPipe: all four forwards move the seeds and statistics before the first
    is recomputed; the result must equal training without recomputation."""
    plain, h_plain, *_ = train(2, 4, "gpipe", False)
    model, history, *_, traced = train(2, 4, "gpipe", True)
    assert traced > 0, "stage 0 never recomputed its forward"
    assert_same(model, plain)
    assert history.history == h_plain.history


def test_recompute_keyword_environment_and_run_flag(monkeypatch):
    monkeypatch.delenv("HYPARFLOW_RECOMPUTE", raising=False)
    assert switch("recompute", None) is False
    for raw, value in [("1", True), ("on", True), ("False", False), ("no", False)]:
        monkeypatch.setenv("HYPARFLOW_RECOMPUTE", raw)
        assert switch("recompute", None) is value
    assert switch("recompute", False) is False, "the keyword wins over the environment"
    monkeypatch.setenv("HYPARFLOW_RECOMPUTE", "maybe")
    with pytest.raises(ConfigError, match="HYPARFLOW_RECOMPUTE='maybe' is not a valid boolean"):
        switch("recompute", None)
    with pytest.raises(ConfigError, match="recompute must be True or False, got 'yes'"):
        hf.fit(zoo.mlp(), np.zeros((4, 12)), np.zeros(4), recompute="yes")
    args = cli.parser().parse_args(["run", "-np", "2", "--recompute", "python", "t.py"])
    monkeypatch.setenv("HYPARFLOW_RECOMPUTE", str(cli._settings(args)["HYPARFLOW_RECOMPUTE"]))
    assert switch("recompute", None) is True
