"""Gradient buckets: whole variables, in backward order, each at least the bucket size."""

from __future__ import annotations

import pytest

from hyparflow.reducer import MAX_BUCKET, MIN_BUCKET, bucket_bounds, bucket_bytes_for


def test_buckets_cover_every_variable_once_from_the_last():
    sizes = [10, 20, 30, 40, 5]  # float32 gradients: 40, 80, 120, 160, 20 bytes
    assert bucket_bounds(sizes, 200) == [(2, 5), (0, 2)]
    assert bucket_bounds(sizes, 1) == [(4, 5), (3, 4), (2, 3), (1, 2), (0, 1)]
    assert bucket_bounds(sizes, 10_000) == [(0, 5)]
    assert bucket_bounds([], 100) == []


def test_bucket_size_is_an_eighth_of_the_stage_within_bounds(monkeypatch):
    monkeypatch.delenv("HYPARFLOW_BUCKET_MB", raising=False)
    assert bucket_bytes_for(1000) == MIN_BUCKET
    assert bucket_bytes_for(80 * 2**20) == pytest.approx(10 * 2**20)
    assert bucket_bytes_for(2**40) == MAX_BUCKET
    monkeypatch.setenv("HYPARFLOW_BUCKET_MB", "0.5")
    assert bucket_bytes_for(2**40) == 2**19


def test_a_step_interrupted_in_its_last_backward_leaves_the_next_fit_unharmed(monkeypatch):
    """A loss-scaled fit reduces even on one rank; if a step stops after handing over
    some buckets (Ctrl-C in a notebook), the next fit starts its count afresh."""
    import keras
    import numpy as np

    import hyparflow as hf
    from hyparflow.reducer import Reducer

    monkeypatch.setenv("HYPARFLOW_BUCKET_MB", "0.0001")  # a bucket per variable
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), "mse")
    x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
    post = Reducer.post

    def interrupted(self, k, values):
        post(self, k, values)
        monkeypatch.setattr(Reducer, "post", post)
        raise KeyboardInterrupt

    monkeypatch.setattr(Reducer, "post", interrupted)
    with pytest.raises(Exception, match="KeyboardInterrupt"):
        hf.fit(model, x, y, batch_size=8, verbose=0)
    before = model.get_weights()
    history = hf.fit(model, x, y, batch_size=8, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert not np.allclose(model.get_weights()[0], before[0])


def test_global_clipnorm_under_loss_scaling_clips_the_unscaled_gradients():
    """A LossScaleOptimizer clips its inner optimizer's unscaled gradients: the norm the
    stages sum must be of those, not of the scaled ones (2 stages x 2 replicas, loopback)."""
    import keras
    import numpy as np
    import zoo

    import hyparflow as hf
    from hyparflow import loopback

    def make():
        keras.utils.set_random_seed(0)
        model = zoo.mlp()
        inner = keras.optimizers.SGD(0.1, global_clipnorm=0.1)
        model.compile(keras.optimizers.LossScaleOptimizer(inner), keras.losses.SparseCategoricalCrossentropy(True))
        return model

    x, y = zoo.sample_inputs(make(), 48)[0], zoo.sample_targets(make(), 48)[0]
    models = [make() for _ in range(4)]
    kw = dict(batch_size=16, num_partitions=2, num_microbatches=2, shuffle=False, verbose=0, balance="flops")
    loopback.run(4, lambda comm: hf.fit(models[comm.Get_rank()], x, y, comm=comm, **kw))
    ref, initial = make(), make().get_weights()
    ref.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(ref.get_weights(), initial))
    err = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(models[0].get_weights(), ref.get_weights()))
    assert moved > 1e-3
    assert err < 1e-5, f"max relative weight difference {err:.2e}"


def test_global_clipnorm_with_the_optimizers_own_accumulation_is_refused_across_stages():
    import keras
    import numpy as np
    import zoo

    import hyparflow as hf
    from hyparflow import loopback

    def make():
        model = zoo.mlp()
        opt = keras.optimizers.SGD(0.1, global_clipnorm=0.1, gradient_accumulation_steps=2)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(True))
        return model

    models, x = [make() for _ in range(2)], np.zeros((8,) + tuple(zoo.mlp().input_shape[1:]), "float32")
    with pytest.raises(Exception, match="gradient_accumulation_steps is not supported across stages"):
        loopback.run(2, lambda comm: hf.fit(models[comm.Get_rank()], x, np.zeros(8, "int32"), batch_size=8,
                                            num_partitions=2, verbose=0, comm=comm))  # fmt: skip


@pytest.mark.parametrize(
    "make, rows",
    [
        (lambda k: k.optimizers.SGD(0.1, momentum=0.9), False),
        (lambda k: k.optimizers.Adam(), True),
        (lambda k: k.optimizers.LossScaleOptimizer(k.optimizers.RMSprop()), True),
        (lambda k: k.optimizers.SGD(0.1, clipvalue=10.0), True),
    ],
    ids=["sgd momentum", "adam", "loss-scaled rmsprop", "sgd clipvalue"],
)
def test_sparse_rows_are_kept_only_for_optimizers_they_matter_to(make, rows):
    """Keras's Adam squares each token occurrence's row of an embedding's gradient, and
    clipping measures rows; SGD's update is the same from the rows' sum, which costs
    nothing more to hand over (the equivalence cases train all of these against Keras)."""
    import keras

    from hyparflow.keras_compat import sparse_rows_matter

    assert sparse_rows_matter(make(keras)) is rows
