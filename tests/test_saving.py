"""Keras's formats: the .keras file, weights files and tf.train.Checkpoint
bring every argument and all four weights back bit for bit; weights of the
wrong shape are refused with the layer named."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from tests.model_helpers import randomize_batch_norms


def _model(channels=4, center=True, seed=0):
    """Batch norms with every argument away from its default, a frozen one
    without scale and offset, and a channels-first one."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(channels, 3, use_bias=False, name="conv"),
        BatchNorm(
            name="bn", momentum=0.75, epsilon=1e-3, center=center,
            beta_initializer="ones", gamma_initializer=keras.initializers.Constant(2.0),
            moving_mean_initializer="ones", moving_variance_initializer="zeros",
            beta_regularizer=keras.regularizers.L2(1e-4),
            gamma_regularizer=keras.regularizers.L1(1e-4),
            beta_constraint=keras.constraints.MaxNorm(3.0),
            gamma_constraint=keras.constraints.NonNeg(),
        ),
        BatchNorm(name="bn_frozen", center=False, scale=False, trainable=False),
        keras.layers.Permute((3, 1, 2)),
        BatchNorm(name="bn_channels_first", axis=1),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="head"),
    ], name="net")
    return randomize_batch_norms(model, seed)


def _batch_norms(model):
    return [layer for layer in model.layers if isinstance(layer, BatchNorm)]


def _assert_same_weights(a, b):
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert [w.name for w in la.weights] == [w.name for w in lb.weights]
        for wa, wb in zip(la.weights, lb.weights):
            np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=f"{la.name}/{wa.name}")


def _x(n=5):
    return np.random.RandomState(1).normal(0.0, 1.0, (n, 6, 6, 2)).astype(np.float32)


def test_keras_file_round_trip_is_exact(tmp_path):
    model = _model()
    model.save(tmp_path / "net.keras")
    loaded = keras.saving.load_model(tmp_path / "net.keras")  # no custom_objects
    for ours, theirs in zip(_batch_norms(model), _batch_norms(loaded)):
        assert type(theirs) is BatchNorm
        assert theirs.get_config() == ours.get_config()
        assert [w.name for w in theirs.weights] == [w.name for w in ours.weights]
    assert [w.name for w in loaded.get_layer("bn").weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    _assert_same_weights(model, loaded)
    np.testing.assert_array_equal(loaded.predict(_x(), verbose=0), model.predict(_x(), verbose=0))


def test_weights_file_round_trip_is_exact(tmp_path):
    model = _model()
    model.save_weights(tmp_path / "net.weights.h5")
    other = _model(seed=1)
    other.load_weights(tmp_path / "net.weights.h5")
    _assert_same_weights(model, other)


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = _model()
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    other = _model(seed=1)
    tf.train.Checkpoint(model=other).read(path).assert_consumed()
    _assert_same_weights(model, other)


def test_load_weights_of_the_wrong_shape_names_the_layer(tmp_path):
    keras.utils.set_random_seed(0)
    four = keras.Sequential([keras.Input((3, 4)), BatchNorm(name="bn")], name="net")
    five = keras.Sequential([keras.Input((3, 5)), BatchNorm(name="bn")], name="net")
    four.save_weights(tmp_path / "four.weights.h5")
    # Keras's own message: the layer, the variable's path and both shapes.
    with pytest.raises(ValueError) as error:
        five.load_weights(tmp_path / "four.weights.h5")
    assert str(error.value) == (
        "A total of 1 objects could not be loaded. Example error message for "
        "object <BatchNorm name=bn, built=True>:\n\n"
        "The shape of the target variable and the shape of the target value in "
        "`variable.assign(value)` must match. variable.shape=(5,), Received: "
        "value.shape=(4,). Target variable: <Variable path=net/bn/gamma, "
        "shape=(5,), dtype=float32, value=[1. 1. 1. 1. 1.]>\n\n"
        "List of objects that could not be loaded:\n"
        "[<BatchNorm name=bn, built=True>]"
    )


def test_load_weights_without_offset_names_the_layer(tmp_path):
    keras.utils.set_random_seed(0)
    without = keras.Sequential([keras.Input((4,)), BatchNorm(name="bn", center=False)], name="net")
    with_offset = keras.Sequential([keras.Input((4,)), BatchNorm(name="bn")], name="net")
    without.save_weights(tmp_path / "without.weights.h5")
    with pytest.raises(ValueError) as error:
        with_offset.load_weights(tmp_path / "without.weights.h5")
    assert str(error.value) == (
        "A total of 1 objects could not be loaded. Example error message for "
        "object <BatchNorm name=bn, built=True>:\n\n"
        "Layer 'bn' expected 4 variables, but received 3 variables during "
        "loading. Expected: ['gamma', 'beta', 'moving_mean', 'moving_variance']"
        "\n\nList of objects that could not be loaded:\n"
        "[<BatchNorm name=bn, built=True>]"
    )


def test_checkpoint_of_the_wrong_shape_names_the_variable(tmp_path):
    four = keras.Sequential([keras.Input((3, 4)), BatchNorm(name="bn")], name="net")
    five = keras.Sequential([keras.Input((3, 5)), BatchNorm(name="bn")], name="net")
    path = tf.train.Checkpoint(model=four).write(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError) as error:
        tf.train.Checkpoint(model=five).read(path)
    # TensorFlow's own message, for whichever variable it restores first.
    assert str(error.value) in [
        "Received incompatible tensor with shape (4,) when attempting to "
        f"restore variable with shape (5,) and name net/bn/{name}:0."
        for name in ("gamma", "beta", "moving_mean", "moving_variance")
    ]
