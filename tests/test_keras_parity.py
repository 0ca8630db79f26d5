"""Tier 3: keras.layers.BatchNormalization as an oracle, weights copied."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from tests.model_helpers import needs_keras_renorm
from tests.reference import random_params

# The core suite runs on both paths: the fused kernel and plain TF ops.
pytestmark = pytest.mark.usefixtures("both_paths")

# Keras's layer computes x * inv + (beta - mean * inv) in float32 and its
# variance in one long sum, so it sits a few float32 ulps from ours; 1e-4
# leaves room for that on O(1) outputs and nothing for a semantic error.
KERAS_TOL = 1e-4


def _pair(shape, axis, momentum=0.9, epsilon=1e-5):
    ours = BatchNorm(axis=axis, momentum=momentum, epsilon=epsilon)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=epsilon)
    ours.build(shape)
    theirs.build(shape)
    weights = [p.astype(np.float32) for p in random_params(shape[axis])]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    return ours, theirs


@pytest.mark.parametrize("shape,axis", [((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1), ((16, 6), -1)])
@pytest.mark.parametrize("momentum,epsilon", [(0.9, 1e-5), (0.99, 1e-3)])
def test_outputs_and_moving_stats_over_several_steps(shape, axis, momentum, epsilon):
    ours, theirs = _pair(shape, axis, momentum, epsilon)
    rng = np.random.RandomState(0)
    for step in range(4):
        x = rng.normal(step, 1.0 + step, shape).astype(np.float32)
        np.testing.assert_allclose(
            ours(x, training=True), theirs(x, training=True), atol=KERAS_TOL, rtol=KERAS_TOL)
    np.testing.assert_allclose(ours.moving_mean, theirs.moving_mean, atol=KERAS_TOL, rtol=KERAS_TOL)
    np.testing.assert_allclose(
        ours.moving_variance, theirs.moving_variance, atol=KERAS_TOL, rtol=KERAS_TOL)
    x = rng.normal(0.0, 2.0, shape).astype(np.float32)
    np.testing.assert_allclose(ours(x), theirs(x), atol=KERAS_TOL, rtol=KERAS_TOL)


@pytest.mark.parametrize("shape,axis", [((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1)])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_wrt_input_gamma_and_beta(shape, axis, training):
    ours, theirs = _pair(shape, axis)
    rng = np.random.RandomState(1)
    x = tf.constant(rng.normal(0.5, 2.0, shape), tf.float32)
    # A random upstream gradient: with sum(y) alone the x-gradient is ~0.
    upstream = tf.constant(rng.normal(0.0, 1.0, shape), tf.float32)
    grads = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * upstream)
        grads.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    for g_ours, g_theirs in zip(*grads):
        np.testing.assert_allclose(g_ours, g_theirs, atol=KERAS_TOL, rtol=KERAS_TOL)


def test_weights_transfer_between_layers_in_both_directions():
    ours, theirs = _pair((5, 4), -1)
    x = np.random.RandomState(2).normal(0.0, 1.0, (5, 4)).astype(np.float32)
    ours(x, training=True)
    theirs.set_weights(ours.get_weights())
    np.testing.assert_allclose(theirs(x), ours(x), atol=KERAS_TOL)
    fresh = BatchNorm()
    fresh.build((None, 4))
    fresh.set_weights(theirs.get_weights())
    np.testing.assert_array_equal(fresh.moving_variance.numpy(), theirs.moving_variance.numpy())


@needs_keras_renorm
@pytest.mark.parametrize("clipping", [None, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}])
def test_renorm_matches_keras_weights_outputs_and_train_inference_gap(clipping):
    # Batch Renormalization as in the paper and Keras 3: the same seven
    # weights in the same order, the same outputs in both modes, and so the
    # same train/inference gap (the case: gamma 2, renorm_momentum
    # equal to momentum, 5 steps).
    kwargs = dict(momentum=0.9, epsilon=1e-3, renorm=True, renorm_momentum=0.9,
                  renorm_clipping=clipping)
    ours = BatchNorm(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    for layer in (ours, theirs):
        layer.build((None, 3))
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    theirs.gamma.assign([2.0, 2.0, 2.0])
    ours.set_weights(theirs.get_weights())
    rng = np.random.RandomState(3)
    for step in range(5):
        x = rng.normal(1.0 + step, 2.0, (16, 3)).astype(np.float32)
        np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True),
                                   atol=KERAS_TOL, rtol=KERAS_TOL)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, atol=KERAS_TOL, rtol=KERAS_TOL)
    gaps = [np.abs(layer(x, training=True) - layer(x, training=False)).max()
            for layer in (ours, theirs)]
    np.testing.assert_allclose(gaps[0], gaps[1], atol=KERAS_TOL)
    # Weights go back the other way too. Move Keras's layer away from ours
    # first (every weight stays positive where it must), so that only the
    # transfer can bring its inference output back to ours.
    theirs.set_weights([2.0 * w + 0.5 for w in theirs.get_weights()])
    assert np.abs(theirs(x) - ours(x)).max() > 100 * KERAS_TOL
    theirs.set_weights(ours.get_weights())
    for a, b in zip(theirs.get_weights(), ours.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(theirs(x), ours(x), atol=KERAS_TOL, rtol=KERAS_TOL)
