"""hf.fit / evaluate / predict as drop-ins for Keras's: the same keywords with the same
meaning, every input kind Keras takes, models whose custom steps cannot be split refused,
and sessions reused by repeated calls. Loopback worlds and single processes, no MPI."""

from __future__ import annotations

import inspect

import cases
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import hyparflow as hf
from hyparflow import loopback, memory
from hyparflow.keras_compat import variable_storage

X = np.random.default_rng(0).standard_normal((48, 12)).astype("float32")
Y = np.random.default_rng(1).integers(0, 3, 48)


def mlp():
    return cases.compiled("mlp", "sgd")


def on_grid(ranks: int, call):
    """`call(model, comm)` on `ranks` loopback ranks, each with its own copy of mlp()."""
    models = [mlp() for _ in range(ranks)]
    return models, loopback.run(ranks, lambda comm: call(models[comm.Get_rank()], comm))


def max_rel(a, b) -> float:
    return max(float(np.abs(u - v).max() / (np.abs(v).max() + 1e-6)) for u, v in zip(a, b))


@pytest.mark.parametrize(
    "ours, theirs", [(hf.fit, keras.Model.fit), (hf.evaluate, keras.Model.evaluate), (hf.predict, keras.Model.predict)]
)
def test_every_keras_keyword_with_its_default(ours, theirs):
    keras_params = [
        p for p in inspect.signature(theirs).parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD
    ]
    mine = list(inspect.signature(ours).parameters.values())
    assert mine[0].name == "model"
    assert [(p.name, p.kind, p.default) for p in mine[1 : 1 + len(keras_params)]] == [
        (p.name, p.kind, p.default) for p in keras_params
    ], "Keras's own parameters, in Keras's order, kinds and defaults"
    assert all(p.kind == p.KEYWORD_ONLY for p in mine[1 + len(keras_params) :]), (
        "hyparflow's own keywords come after, by name"
    )


def test_evaluate_and_predict_keywords_behave_as_in_keras():
    def call(model, comm):
        layout = {"num_partitions": 2, "num_microbatches": 2, "comm": comm}
        return (
            hf.evaluate(model, X, Y, batch_size=16, verbose=0, steps=2, return_dict=True, **layout),
            hf.predict(model, X, batch_size=16, verbose=0, steps=2, **layout),
        )

    models, results = on_grid(4, call)
    ref = mlp()
    logs, preds = results[0]
    assert logs == pytest.approx(ref.evaluate(X, Y, batch_size=16, verbose=0, steps=2, return_dict=True), rel=1e-5)
    ref_preds = ref.predict(X, batch_size=16, verbose=0, steps=2)
    assert preds.shape == ref_preds.shape and len(preds) == 32, "steps=2 batches of 16"
    np.testing.assert_allclose(preds, ref_preds, rtol=1e-5, atol=1e-6)


def test_validation_freq_steps_and_batch_size_as_in_keras():
    kw = dict(
        batch_size=8,
        epochs=4,
        validation_data=(X[:40], Y[:40]),
        validation_freq=2,
        validation_steps=3,
        validation_batch_size=4,
        shuffle=False,
        verbose=0,
    )
    _, histories = on_grid(4, lambda m, comm: hf.fit(m, X, Y, num_partitions=2, comm=comm, **kw))
    ref = mlp().fit(X, Y, **kw)
    ours = histories[0].history
    assert sorted(ours) == sorted(ref.history)
    assert len(ours["val_loss"]) == len(ref.history["val_loss"]) == 2, "validated after epochs 2 and 4 only"
    for key, values in ref.history.items():
        assert ours[key] == pytest.approx(values, rel=1e-5, abs=1e-6), key


def _generator(n_batches: int, forever: bool = False):
    while True:
        for b in range(n_batches):
            yield X[16 * b : 16 * (b + 1)], Y[16 * b : 16 * (b + 1)]
        if not forever:
            return


class Batches(keras.utils.PyDataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return X[16 * i : 16 * (i + 1)], Y[16 * i : 16 * (i + 1)]


INPUTS = {
    "tf.data": (lambda: tf.data.Dataset.from_tensor_slices((X, Y)).batch(16), {}),
    "tf.data infinite": (lambda: tf.data.Dataset.from_tensor_slices((X, Y)).batch(16).repeat(), {"steps_per_epoch": 3}),
    "PyDataset": (Batches, {}),
    "generator": (lambda: _generator(3, forever=True), {"steps_per_epoch": 3}),
    "dict by input name": (lambda: ({"x": X}, Y), {"batch_size": 16}),
    "pandas": (lambda: (pd.DataFrame(X), pd.Series(Y)), {"batch_size": 16}),
}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_every_input_kind_trains_as_keras(kind):
    make, kw = INPUTS[kind]

    def args():
        data = make()
        return (data if isinstance(data, tuple) else (data,)), kw | {"epochs": 2, "shuffle": False, "verbose": 0}

    models, _ = on_grid(
        4, lambda m, comm: hf.fit(m, *args()[0], num_partitions=2, num_microbatches=2, comm=comm, **args()[1])
    )
    ref = mlp()
    ref.fit(*args()[0], **args()[1])
    assert max_rel(models[0].get_weights(), ref.get_weights()) < 1e-5


def test_ranks_disagreeing_on_steps_fail_clearly_instead_of_hanging():
    def call(model, comm):
        n = 48 if comm.Get_rank() == 0 else 32
        return hf.fit(model, X[:n], Y[:n], batch_size=16, verbose=0, num_partitions=2, comm=comm)

    with pytest.raises(RuntimeError, match="training settings .* differs between ranks"):
        on_grid(2, call)


def test_custom_train_step_is_refused_with_what_to_do():
    class Custom(keras.Model):
        def train_step(self, data):
            raise AssertionError("never run")

    inp = keras.Input((12,))
    model = Custom(inp, keras.layers.Dense(3)(inp))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(hf.ConfigError, match="overrides train_step; hyparflow.fit runs Keras's standard step"):
        hf.fit(model, X, Y, verbose=0)
    model.predict(X, verbose=0)  # predict_step is Keras's own: predict is allowed
    np.testing.assert_allclose(hf.predict(model, X, verbose=0), model.predict(X, verbose=0), rtol=1e-6)


def test_a_second_fit_reuses_the_session_and_a_new_layout_or_compile_does_not():
    from hyparflow.session import _SESSIONS

    model = mlp()
    hf.fit(model, X, Y, batch_size=16, verbose=0)
    first = _SESSIONS[model][1]
    hf.fit(model, X, Y, batch_size=16, verbose=0)
    hf.evaluate(model, X, Y, verbose=0)
    assert _SESSIONS[model][1] is first, "same model, layout and compilation: one session"
    hf.fit(model, X, Y, batch_size=16, verbose=0, num_microbatches=2)
    assert _SESSIONS[model][1] is not first and first.transport.pipe is None, "a new layout closes the old session"
    second = _SESSIONS[model][1]
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hf.fit(model, X, Y, batch_size=16, verbose=0, num_microbatches=2)
    assert _SESSIONS[model][1] is not second, "a recompiled model gets a new session"


def test_a_model_dropped_after_fit_is_freed_with_its_session():
    """A session holds its model's layers and variables: keeping sessions beside the models
    would keep every model ever trained in the process (a hyperparameter search) alive."""
    import gc
    import weakref

    models, histories = on_grid(
        2, lambda model, comm: hf.fit(model, X, Y, batch_size=16, num_partitions=2, verbose=0, comm=comm)
    )
    refs = [weakref.ref(m) for m in models]
    # What backs each held variable: a compiled stage's gradient must not keep it either.
    storage = [weakref.ref(variable_storage(v)) for m in models for v in m.variables if not memory.is_released(v)]
    del models, histories  # a History holds its model, as in Keras
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert sum(r() is not None for r in storage) == 0, f"{len(storage)} variables' storage kept alive"


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_progress_bar_shows_keras_values_with_no_per_step_stop_agreement(monkeypatch, steps_per_execution):
    """With only the progress bar reading batches, the logs reach it a step late (no rank waits
    for them) and no rank waits on a per-step stop decision; the bar gets every value Keras's gets."""
    from keras.src.utils.progbar import Progbar

    from hyparflow import loop

    shown: list = []
    update = Progbar.update
    monkeypatch.setattr(
        Progbar,
        "update",
        lambda bar, cur, values=None, finalize=None: (
            shown.append((cur, dict(values or []), finalize)),
            update(bar, cur, values, finalize),
        )[1],
    )
    stops: list = []
    agree = loop.agree_to_stop
    monkeypatch.setattr(loop, "agree_to_stop", lambda session: (stops.append(1), agree(session))[1])

    def mlp_every(n):
        model = mlp()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=model.loss, metrics=["accuracy"], steps_per_execution=n)
        return model

    kw = dict(batch_size=8, epochs=2, shuffle=False, verbose=1, validation_data=(X[:16], Y[:16]))
    models = [mlp_every(steps_per_execution) for _ in range(4)]
    loopback.run(4, lambda comm: hf.fit(models[comm.Get_rank()], X, Y, num_partitions=2, comm=comm, **kw))
    ours, shown[:] = list(shown), []
    mlp_every(steps_per_execution).fit(X, Y, **kw)
    assert len(stops) == 4 * 2, "one stop decision per epoch on each of 4 ranks, none per step"
    assert [(c, f) for c, _, f in ours] == [(c, f) for c, _, f in shown], "the same bar updates as Keras's"
    for (_, mine, _), (_, theirs, _) in zip(ours, shown):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6)
