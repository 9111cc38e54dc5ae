"""The distributed engine against plain Keras, under real mpirun (4 ranks, one launch)."""

from __future__ import annotations

import cases
import pytest
from conftest import run_script

CASES = cases.UNDER_MPI  # every case of cases.CASES runs in one process in tests/test_loopback.py


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_script(4, "equivalence.py", tmp=tmp_path_factory.mktemp("eq"), timeout=600)


@pytest.mark.mpi
@pytest.mark.parametrize("case", CASES)
def test_weights_equal_plain_keras(results, case):
    r = results[case]
    assert r["moved"] > 1e-3, "training did not change the weights"
    assert r["err"] < 1e-4, f"max relative weight difference {r['err']:.2e}"


@pytest.mark.mpi
@pytest.mark.parametrize(
    "case", ["history P2 R2 M2 two epochs", "multi_io P4 M4 sample weights adam", "uneven P2 R2 M4 adam"]
)
def test_history_equals_plain_keras(results, case):
    ours, ref = results[case]["history"], results[case]["ref_history"]
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


@pytest.mark.mpi
def test_optimizer_state_only_where_its_variables_live(results):
    r = results["mlp P4 M4 1f1b adam"]
    owned = [set(o) for o in r["owned"]]
    assert all(owned), "every stage holds slots for its own variables"
    assert set.union(*owned) == set(range(r["n_trainable"]))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not owned[i] & owned[j], f"ranks {i} and {j} both hold optimizer state for {owned[i] & owned[j]}"


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_predict_uncompiled_model_in_one_process(policy):
    """Keras predicts with an uncompiled model, in the policy's output dtype; so must we."""
    import keras
    import numpy as np
    import zoo

    import hyparflow as hf

    keras.mixed_precision.set_global_policy(policy)
    try:
        model = zoo.mlp()
        x = np.random.default_rng(0).standard_normal((10, 12)).astype("float32")
        ours, ref = hf.predict(model, x, batch_size=4), model.predict(x, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert ours.dtype == ref.dtype
    np.testing.assert_allclose(ours.astype("float32"), ref.astype("float32"), rtol=1e-5, atol=1e-6)
