"""The layer inside tf.function graphs: tracing, XLA, a tensor `training`."""

import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm

# The core suite runs on both paths: the fused kernel and plain TF ops.
pytestmark = pytest.mark.usefixtures("both_paths")

F32_TOL = 1e-5  # see tests/test_ops.py


def test_one_trace_across_batch_sizes_with_input_signature():
    layer = BatchNorm()
    layer.build((None, 3))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def step(x):
        return layer(x, training=True)

    rng = np.random.RandomState(0)
    for n in (2, 3, 7):
        x = rng.normal(0.0, 1.0, (n, 3)).astype(np.float32)
        y = step(x).numpy()
        np.testing.assert_allclose(y.mean(0), 0.0, atol=F32_TOL)
    assert step.experimental_get_tracing_count() == 1


def test_jit_compile_matches_eager_and_updates_moving_stats():
    rng = np.random.RandomState(1)
    x = rng.normal(1.0, 2.0, (8, 5, 5, 6)).astype(np.float32)
    eager, xla = BatchNorm(), BatchNorm()
    eager.build(x.shape)
    xla.build(x.shape)
    step = tf.function(lambda x: xla(x, training=True), jit_compile=True)
    for _ in range(3):
        np.testing.assert_allclose(step(x), eager(x, training=True), atol=F32_TOL, rtol=F32_TOL)
    np.testing.assert_allclose(xla.moving_mean, eager.moving_mean, rtol=F32_TOL)
    np.testing.assert_allclose(xla.moving_variance, eager.moving_variance, rtol=F32_TOL)
    infer = tf.function(lambda x: xla(x, training=False), jit_compile=True)
    np.testing.assert_allclose(infer(x), eager(x), atol=F32_TOL, rtol=F32_TOL)


def test_tensor_training_flag_one_trace_both_branches():
    layer = BatchNorm(momentum=0.5, epsilon=3.0)
    layer.build((None, 1))
    x = tf.constant([[1.0], [3.0]])  # batch mean 2, variance 1

    @tf.function
    def f(training):
        return layer(x, training=training)

    np.testing.assert_array_equal(f(tf.constant(False)), [[1 / 2], [3 / 2]])
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [0.0])  # no update
    np.testing.assert_array_equal(f(tf.constant(True)), [[-0.5], [0.5]])
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [1.0])  # one update
    assert f.experimental_get_tracing_count() == 1


def test_tensor_training_flag_in_eager_mode_is_read():
    layer = BatchNorm(momentum=0.0)
    x = tf.constant([[1.0], [3.0]])
    layer(x, training=tf.constant(True))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [2.0])
