"""The layer inside Keras models: fit / evaluate / predict, mixed precision,
and the .keras round trip."""

import keras
import numpy as np
import pytest

from keras_bn import BatchNorm
from tests.reference import np_batch_norm

# The core suite runs on both paths: the fused kernel and plain TF ops.
pytestmark = pytest.mark.usefixtures("both_paths")

F32_TOL = 1e-5  # see tests/test_ops.py


def _cnn(dtype_policy=None):
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        BatchNorm(name="bn_conv"),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(5, use_bias=False),
        BatchNorm(name="bn_dense"),
        keras.layers.ReLU(),
        keras.layers.Dense(3, dtype="float32"),
    ])


def _data(n=24, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(0.5, 2.0, (n, 6, 6, 2)).astype(np.float32)
    y = rng.randint(0, 3, n)
    return x, y


def _moving_stats(model):
    return [
        v.numpy().copy()
        for layer in model.layers if isinstance(layer, BatchNorm)
        for v in (layer.moving_mean, layer.moving_variance)
    ]


def test_fit_updates_evaluate_and_predict_do_not():
    model = _cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    before = _moving_stats(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after_fit = _moving_stats(model)
    for b, a in zip(before, after_fit):
        assert not np.allclose(a, b)  # fit passes training=True
    model.evaluate(x, y, batch_size=8, verbose=0)
    model.predict(x, batch_size=8, verbose=0)
    for a, e in zip(after_fit, _moving_stats(model)):
        np.testing.assert_array_equal(a, e)


def test_fit_moving_stats_follow_the_closed_form():
    # A model that is one BatchNorm: each of the 3 steps sees one batch and
    # the moving mean must be the EMA of the three batch means.
    model = keras.Sequential([keras.Input((2,)), BatchNorm(momentum=0.5)])
    model.compile("sgd", "mse")
    rng = np.random.RandomState(1)
    x = rng.normal(3.0, 2.0, (12, 2)).astype(np.float32)
    model.fit(x, np.zeros_like(x), batch_size=4, epochs=1, shuffle=False, verbose=0)
    mean, var = np.zeros(2), np.ones(2)
    for i in range(3):
        batch = x[4 * i: 4 * i + 4].astype(np.float64)
        mean = 0.5 * mean + 0.5 * batch.mean(0)
        var = 0.5 * var + 0.5 * batch.var(0)
    bn = model.layers[0]
    np.testing.assert_allclose(bn.moving_mean, mean, rtol=F32_TOL)
    np.testing.assert_allclose(bn.moving_variance, var, rtol=F32_TOL)


def test_predict_uses_moving_stats():
    model = keras.Sequential([keras.Input((3,)), BatchNorm()])
    bn = model.layers[0]
    bn.set_weights([np.array([1.0, 2.0, 0.5], np.float32), np.array([0.0, 1.0, -1.0], np.float32),
                    np.array([1.0, -1.0, 2.0], np.float32), np.array([4.0, 1.0, 0.25], np.float32)])
    x = np.random.RandomState(2).normal(0.0, 1.0, (7, 3)).astype(np.float32)
    want, _, _ = np_batch_norm(x, *bn.get_weights(), training=False)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("policy,tol", [("mixed_float16", 1e-2), ("mixed_bfloat16", 6e-2)])
def test_mixed_precision_policy(policy, tol):
    # Tolerance: outputs are rounded to the half type; logits of O(1-10)
    # after three layers agree to a few half-precision ulps.
    x, y = _data()
    reference = _cnn()
    keras.mixed_precision.set_global_policy(policy)
    model = _cnn()
    model.set_weights(reference.get_weights())
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            assert layer.compute_dtype == policy.split("_")[1]
            assert all(w.dtype == "float32" for w in layer.weights)
    lone = BatchNorm()  # a separate layer, so the model's statistics stay put
    assert lone(x[:2], training=True).dtype == policy.split("_")[1]
    np.testing.assert_allclose(model.predict(x, verbose=0), reference.predict(x, verbose=0),
                               atol=tol, rtol=tol)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    reference.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    reference.fit(x, y, batch_size=8, epochs=2, verbose=0)
    # The moving statistics are float32 and track the float32 model closely.
    for ours, ref in zip(_moving_stats(model), _moving_stats(reference)):
        np.testing.assert_allclose(ours, ref, atol=5 * tol, rtol=5 * tol)


def test_keras_file_round_trip_without_custom_objects(tmp_path):
    model = _cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("bn_conv"), BatchNorm)
    assert loaded.get_layer("bn_conv").get_config() == model.get_layer("bn_conv").get_config()
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_fit_with_jit_compile_matches_fit_without():
    # Keras compiles fit() with XLA by default on GPUs; on CPU ask for it.
    x, y = _data()
    runs = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = _cnn()
        model.compile(keras.optimizers.SGD(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        runs.append(_moving_stats(model) + [model.predict(x, verbose=0)])
    # Three SGD steps apart from float32 reduction order: well within 1e-4.
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
