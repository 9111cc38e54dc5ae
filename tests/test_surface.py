"""Keras-native surface under real mpirun (4 ranks, one launch): History with validation,
callbacks and stopping, layout-independent checkpoints, predict/evaluate, tf.data, and a
model that trains to the same accuracy as plain Keras."""

from __future__ import annotations

import pytest
from conftest import run_script

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def r(tmp_path_factory):
    return run_script(4, "surface.py", tmp=tmp_path_factory.mktemp("surface"), timeout=600)


def assert_logs_equal(ours, ref):
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


def test_history_with_validation_equals_keras(r):
    assert_logs_equal(r["history"]["ours"], r["history"]["ref"])
    assert len(r["history"]["ours"]["val_loss"]) == 3


def test_early_stopping_same_epoch_everywhere(r):
    assert r["early_stopping_epochs"] == [2, 2, 2, 2]


def test_stop_requested_on_one_rank_reaches_all(r):
    assert r["rank1_stop_epochs"] == [1, 1, 1, 1]


def test_resume_under_another_layout_equals_uninterrupted(r):
    assert r["resume_moved"] > 1e-3  # the second epoch changes the weights
    assert r["resume_p4"] < 1e-5
    assert r["resume_keras"] < 1e-5


def test_periodic_checkpoints_keep_newest_and_resume(r):
    assert r["checkpoints"] == ["epoch-00002.keras", "epoch-00003.keras"]
    assert r["after_resume"] == ["epoch-00003.keras", "epoch-00004.keras"]
    assert r["resumed_epochs"] == [3]
    assert r["checkpoint_resume_err"] < 1e-5


def test_predict_multi_output_equals_keras(r):
    assert r["predict_shapes"] == [[37, 4], [37, 3]]
    assert r["predict_err"] < 1e-5


def test_evaluate_multi_output_equals_keras(r):
    assert_logs_equal(r["evaluate"]["ours"], r["evaluate"]["ref"])


def test_dataset_uneven_completes_and_counts_every_sample(r):
    d = r["dataset"]
    assert d["batches"] == 10  # 5 batches (10,10,10,10,5) x 2 epochs, on every rank
    assert_logs_equal(d["ours"], d["ref"])
    assert d["err"] < 1e-4


def test_digits_cnn_reaches_keras_accuracy(r):
    ours, ref = r["digits"]["ours"], r["digits"]["ref"]
    assert ref > 0.8
    assert abs(ours - ref) <= 0.01


@pytest.mark.parametrize(
    "policy, dtype, optimizer",
    [("mixed_float16", "float16", "LossScaleOptimizer"), ("mixed_bfloat16", "bfloat16", "Adam")],
)
def test_mixed_precision(r, policy, dtype, optimizer):
    m = r["mixed"][policy]
    assert m["boundary_dtypes"] == [dtype]
    assert m["optimizer"] == optimizer
    assert m["loss"] == pytest.approx(m["ref_loss"], rel=2e-3)
    # Within a small multiple of what a rounding-sized change of the inputs does to plain Keras.
    assert m["err"] < max(3 * m["floor"], 1e-3), f"error {m['err']:.2e}, Keras's own noise floor {m['floor']:.2e}"
