"""Losses that are not one number per sample (per token, per pixel, masked, temporally
weighted) trained by the engine against plain Keras fit(shuffle=False) on the same
global batches: in one process (world size 1), and under one 4-rank mpirun launch."""

from __future__ import annotations

import keras
import losszoo as z
import numpy as np
import pytest
from conftest import run_script

import hyparflow as hf

MPI_CASES = [
    "lm explicit mask P2 R2 M2",
    "lm explicit mask P4 M2",
    "lm temporal weights P2 R2 M2",
    "lm temporal weights P4 M2",
    "lm mask_zero P1 R4 M2",
    "unet P2 R2 M2",
    "seq2seq ignore_class P2 R2 M2",
    "softmax logits P2 R2 M2",
]


def _check(weights, ref_weights, start, history, ref_history):
    assert max(float(np.abs(a - b).max()) for a, b in zip(weights, start)) > 1e-3, "training did not move"
    err = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6)) for a, b in zip(weights, ref_weights))
    assert err < 1e-4, f"max relative weight difference {err:.2e}"
    assert sorted(history) == sorted(ref_history)
    for key in ref_history:
        assert history[key] == pytest.approx(ref_history[key], rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_script(4, "loss_equivalence.py", tmp=tmp_path_factory.mktemp("loss"), timeout=600)


@pytest.mark.mpi
@pytest.mark.parametrize("case", MPI_CASES)
def test_equals_plain_keras_on_four_ranks(results, case):
    r = results[case]
    assert r["moved"] > 1e-3, "training did not change the weights"
    assert r["err"] < 1e-4, f"max relative weight difference {r['err']:.2e}"
    for key in r["ref_history"]:
        assert r["history"][key] == pytest.approx(r["ref_history"][key], rel=1e-5, abs=1e-6), key
    assert sorted(r["history"]) == sorted(r["ref_history"])


@pytest.mark.parametrize("padding", ["mask_zero", "temporal weights", "mask_zero and add_loss"])
def test_causal_lm_in_one_process(padding):
    """P=1, three uneven micro-batches per step: each holds a different number of tokens."""
    mask = None if padding == "temporal weights" else "zero"

    def build():
        model = z.causal_lm(mask=mask, penalty="add_loss" in padding)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(keras.optimizers.SGD(0.5), loss, metrics=["accuracy"], weighted_metrics=["accuracy"])
        return model

    x, y, pad = z.lm_data(26)
    sw = None if mask else (pad * np.random.default_rng(2).uniform(0.2, 2.0, pad.shape)).astype("float32")
    model, ref, start = build(), build(), build().get_weights()
    hist = hf.fit(model, x, y, batch_size=13, num_microbatches=3, shuffle=False, verbose=0, sample_weight=sw)
    href = ref.fit(x, y, batch_size=13, shuffle=False, verbose=0, sample_weight=sw)
    _check(model.get_weights(), ref.get_weights(), start, hist.history, href.history)
