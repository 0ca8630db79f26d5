"""The pieces of the TF-ops kernel (keras_bn/backend/tensorflow/
tf_ops_kernel.py) against NumPy: the layout of a call and its statistics
(its affine terms are ops.affine_terms, tested in test_ops). The kernel as
a whole is tested through the layer and the op (test_layer, test_offsets,
test_gradients, ...)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_bn.backend.tensorflow import tf_ops_kernel as kernel


def _x(shape, offset=0.0, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.normal(size=shape) * rng.uniform(0.1, 1.0, shape[-1]) + offset).astype("float32")


def test_layout_of_ghost_batches_keeps_the_group_axis():
    x = tf.zeros((8, 3, 5))
    lay = kernel.layout(x, 2, 4, None, "float32")
    assert tuple(lay.view(x).shape) == (2, 4, 3, 5)
    assert lay.channel_axes == (3,) and lay.per_group == {0, 3}
    assert lay.axes == [1, 2] and lay.rank == 4 and lay.weights is None


def test_layout_broadcasts_a_mask_to_weights_of_the_view():
    x = tf.zeros((8, 3, 5))
    lay = kernel.layout(x, 2, 4, tf.ones((8, 3, 1), tf.bool), "float32")
    assert tuple(lay.weights.shape) == (2, 4, 3, 5)
    assert lay.weights.dtype == tf.float32


@pytest.mark.parametrize("offset", [0.0, 1e6], ids=["centred", "offset_1e6"])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "graph"])
def test_statistics_match_float64_of_the_same_values(offset, traced):
    # At 1e6 the channel is offset-dominated: the second pair of passes
    # runs (the relative mean is then nonzero); centred, the first is exact.
    x = _x((256, 4), offset)
    fn = lambda x: kernel.statistics(x, x, [0], None, "float32")  # noqa: E731
    count, shift, mean, variance, relative = (tf.function(fn) if traced else fn)(tf.constant(x))
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(count.numpy(), np.full((1, 4), 256.0))
    np.testing.assert_allclose((shift + mean).numpy()[0], x64.mean(0), rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(variance.numpy()[0], x64.var(0), rtol=1e-5)
    assert bool(relative) == (offset > 0)


def test_weighted_statistics_count_only_the_weighted_positions():
    x = _x((6, 3))
    w = np.array([1, 1, 0, 1, 0, 1], np.float32)[:, None] * np.ones((1, 3), np.float32)
    count, shift, mean, variance, relative = kernel.statistics(
        tf.constant(x), tf.constant(x), [0], tf.constant(w), "float32")
    kept = x[w[:, 0] == 1].astype(np.float64)
    np.testing.assert_array_equal(count.numpy()[0], [4.0] * 3)
    np.testing.assert_allclose((shift + mean).numpy()[0], kept.mean(0), rtol=1e-6)
    np.testing.assert_allclose(variance.numpy()[0], kept.var(0), rtol=1e-5)
    assert relative is True
