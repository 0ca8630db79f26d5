"""Tests of the pure op `keras_bn.batch_norm` and its helpers in ops.py."""

import numpy as np
import pytest
import tensorflow as tf

from keras_bn import batch_norm
from keras_bn import ops
from tests.reference import np_batch_norm
from tests.reference import random_params

# The core suite runs on both paths: the fused kernel and plain TF ops.
pytestmark = pytest.mark.usefixtures("both_paths")

# float32 carries ~7 significant digits; after a mean, a variance and an
# rsqrt over tens of values the error stays a few ulps of O(1) outputs.
F32_TOL = 1e-5


# --- Tier 1: hand-computed cases with exact answers -----------------------


def test_training_hand_computed():
    # Channel 0 holds {1, 3}: mean 2, biased variance 1; epsilon 3 makes
    # sqrt(var + eps) = 2 so every value below is exact in binary floating
    # point. Channel 1 is constant: variance 0, so y = beta.
    x = tf.constant([[1.0, 5.0], [3.0, 5.0]])
    y, mean, var = batch_norm(
        x, [2.0, 1.0], [1.0, -1.0], [0.0, 0.0], [1.0, 1.0],
        training=True, momentum=0.5, epsilon=3.0,
    )
    np.testing.assert_array_equal(y, [[0.0, -1.0], [2.0, -1.0]])
    np.testing.assert_array_equal(mean, [1.0, 2.5])  # 0.5*0 + 0.5*{2, 5}
    np.testing.assert_array_equal(var, [1.0, 0.5])  # 0.5*1 + 0.5*{1, 0}


def test_inference_hand_computed():
    # Moving mean 1, moving variance 1, epsilon 3: y = gamma*(x-1)/2 + beta.
    x = tf.constant([[1.0, 5.0], [3.0, -3.0]])
    y, mean, var = batch_norm(
        x, [2.0, 1.0], [1.0, -1.0], [1.0, 1.0], [1.0, 1.0],
        training=False, momentum=0.5, epsilon=3.0,
    )
    np.testing.assert_array_equal(y, [[1.0, 1.0], [3.0, -3.0]])
    np.testing.assert_array_equal(mean, [1.0, 1.0])
    np.testing.assert_array_equal(var, [1.0, 1.0])


def test_no_scale_no_offset_hand_computed():
    x = tf.constant([[1.0], [3.0]])
    y, _, _ = batch_norm(x, None, None, [0.0], [1.0], training=True, epsilon=3.0)
    np.testing.assert_array_equal(y, [[-0.5], [0.5]])


def test_momentum_one_keeps_and_zero_replaces_moving_stats():
    x = tf.constant([[1.0], [3.0]])
    _, mean, var = batch_norm(x, None, None, [7.0], [9.0], training=True, momentum=1.0)
    np.testing.assert_array_equal([mean[0], var[0]], [7.0, 9.0])
    _, mean, var = batch_norm(x, None, None, [7.0], [9.0], training=True, momentum=0.0)
    np.testing.assert_array_equal([mean[0], var[0]], [2.0, 1.0])


def test_stddev_of_and_variance_of_are_inverses_hand_computed():
    # sqrt(3 + 1) = 2 and 2^2 - 1 = 3 exactly. A stddev below sqrt(epsilon)
    # (Keras's initial one lacks epsilon) stands for variance 0, not less.
    stddev = ops.stddev_of(variance=tf.constant([3.0, 0.0]), epsilon=1.0)
    np.testing.assert_array_equal(stddev, [2.0, 1.0])
    variance = ops.variance_of(stddev=tf.constant([2.0, 1.0, 0.5]), epsilon=1.0)
    np.testing.assert_array_equal(variance, [3.0, 0.0, 0.0])


# --- Tier 2: float64 NumPy reference across ranks, axes and modes ---------

SHAPES_AND_AXES = [
    ((6, 4), -1),  # Dense output
    ((6, 4), 1),
    ((4, 7, 3), -1),  # Conv1D output
    ((4, 3, 7), 1),
    ((8, 5, 5, 6), -1),  # Conv2D NHWC
    ((8, 6, 5, 5), 1),  # Conv2D NCHW
    ((2, 3, 4, 5, 3), -1),  # Conv3D NDHWC
    ((2, 3, 4, 5, 3), 1),
    ((3, 4, 5), 0),  # the channel axis first, the batch axis reduced with others
]


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_float64_reference(shape, axis, training):
    rng = np.random.RandomState(1)
    x = rng.normal(0.5, 2.0, shape)
    params = random_params(shape[axis])
    want = np_batch_norm(x, *params, training=training, axis=axis)
    got = batch_norm(
        x.astype(np.float32), *[p.astype(np.float32) for p in params],
        training=training, axis=axis,
    )
    for g, w in zip(got, want):
        assert g.dtype == tf.float32
        np.testing.assert_allclose(g, w, rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES[:6])
def test_float64_input_is_exact_to_float64_precision(shape, axis):
    rng = np.random.RandomState(2)
    x = rng.normal(-1.0, 3.0, shape)
    params = random_params(shape[axis])
    want = np_batch_norm(x, *params, training=True, axis=axis)
    got = batch_norm(x, *params, training=True, axis=axis)
    for g, w in zip(got, want):
        assert g.dtype == tf.float64
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_moving_stats_after_several_steps_closed_form():
    # The same batch k times: m_k = momentum^k * m_0 + (1 - momentum^k) * mu.
    rng = np.random.RandomState(3)
    x = rng.normal(2.0, 3.0, (16, 4))
    mu, var = x.mean(0), x.var(0)
    m0, v0 = np.full(4, 0.5), np.full(4, 2.0)
    mean, variance = m0, v0
    k, momentum = 7, 0.8
    for _ in range(k):
        _, mean, variance = batch_norm(
            x, None, None, mean, variance, training=True, momentum=momentum
        )
    decay = momentum**k
    np.testing.assert_allclose(mean, decay * m0 + (1 - decay) * mu, rtol=1e-12)
    np.testing.assert_allclose(variance, decay * v0 + (1 - decay) * var, rtol=1e-12)


def test_large_common_offset_variance_no_worse_than_tf_moments():
    # 1e4 + N(0, 1) in float32: ulp(1e4) ~ 1e-3, so a naive E[x^2] - E[x]^2
    # would lose every digit, and one long float32 sum over 128*16*16 values
    # loses several. Compare both estimates to float64 truth.
    rng = np.random.RandomState(4)
    x64 = 1e4 + rng.normal(0.0, 1.0, (128, 16, 16, 4))
    x = x64.astype(np.float32)
    truth = x.astype(np.float64).var(axis=(0, 1, 2))
    _, ours = ops.moments(x, axis=-1)
    _, theirs = tf.nn.moments(tf.constant(x), axes=[0, 1, 2])
    ours_err = np.abs(ours.numpy() - truth)
    theirs_err = np.abs(theirs.numpy() - truth)
    assert np.all(ours.numpy() >= 0)
    np.testing.assert_allclose(ours, truth, rtol=1e-5)
    # Per channel: no worse than tf.nn.moments, up to one float32 ulp of 1.
    assert np.all(ours_err <= theirs_err + 1.2e-7), (ours_err, theirs_err)


def test_variance_never_negative_for_constant_channel_with_offset():
    x = tf.fill([33, 3], 1e4 + 0.1)
    mean, var = ops.moments(x)
    assert np.all(var.numpy() >= 0.0)
    np.testing.assert_allclose(mean, np.float32(1e4 + 0.1))


def test_corrected_moments_hand_computed():
    # Values 1e6 + {0, 1, 2, 3} (exact in float32) about a shift of 1e6 + 3:
    # d = {-3, -2, -1, 0}, mean(d) = -1.5, mean(d^2) = 3.5, variance 1.25,
    # every intermediate exact.
    x = tf.constant([[1e6], [1e6 + 1], [1e6 + 2], [1e6 + 3]], tf.float32)
    mean, var = ops.corrected_moments(x, [0], tf.constant([[1e6 + 3]], tf.float32))
    assert mean.numpy().tolist() == [[-1.5]] and var.numpy().tolist() == [[1.25]]


@pytest.mark.parametrize("shape", [(4096, 3), (300, 3), (64, 8, 8, 3)])
def test_corrected_moments_exact_about_an_unrepresentative_shift(shape):
    # The batch's first rows 3 std above the rest: a sample mean as the
    # shift lies far from the batch mean, and the correction removes its
    # square. float64 statistics of the same float32 values as the truth;
    # 1e-5 of the variance is the error bound 1 + mean(d)^2 / variance
    # (about 10 here) times a few float32 epsilons.
    rng = np.random.default_rng(0)
    x = 1e6 + 0.1 * rng.standard_normal(shape)
    x[:max(1, 64 // int(np.prod(shape[1:-1])))] += 0.3
    x = x.astype(np.float32)
    axes = list(range(len(shape) - 1))
    shift = ops.sample_shift(tf.constant(x), axes)
    mean, var = ops.corrected_moments(tf.constant(x), axes, shift)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose((shift + mean).numpy().ravel(), x64.mean(tuple(axes)), rtol=2e-7)
    np.testing.assert_allclose(var.numpy().ravel(), x64.var(tuple(axes)), rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(tf.float16, 2e-3), (tf.bfloat16, 1.6e-2)])
def test_half_precision_stats_in_float32_output_in_input_dtype(dtype, tol):
    # Tolerance: a few ulps of the half type for O(1) outputs (float16 has an
    # 11-bit significand, ulp(2) ~ 2e-3; bfloat16 8 bits, ulp(2) ~ 1.6e-2).
    rng = np.random.RandomState(5)
    x = rng.normal(1.0, 2.0, (8, 5, 5, 6))
    xh = tf.cast(x, dtype)
    params = random_params(6)
    want = np_batch_norm(tf.cast(xh, tf.float64).numpy(), *params, training=True)
    y, mean, var = batch_norm(xh, *params, training=True)
    assert y.dtype == dtype
    assert mean.dtype == tf.float32 and var.dtype == tf.float32
    np.testing.assert_allclose(tf.cast(y, tf.float64), want[0], atol=2 * tol, rtol=tol)
    # The statistics of the (already rounded) half input are float32-exact.
    np.testing.assert_allclose(mean, want[1], rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(var, want[2], rtol=F32_TOL, atol=F32_TOL)


def test_float16_large_values_do_not_overflow_statistics():
    # 300^2 * 4096 = 3.7e8 overflows float16 (max 65504); float32 sums don't.
    x = tf.cast(tf.fill([4096, 2], 300.0), tf.float16) + tf.cast(
        tf.reshape(tf.range(8192) % 2, [4096, 2]), tf.float16
    )
    _, mean, var = batch_norm(x, None, None, [0.0, 0.0], [1.0, 1.0],
                              training=True, momentum=0.0)
    assert np.all(np.isfinite(mean.numpy())) and np.all(np.isfinite(var.numpy()))
    np.testing.assert_allclose(mean, [300.0, 301.0])


# --- gradients -----------------------------------------------------------


def test_gradient_matches_finite_differences_float64():
    rng = np.random.RandomState(6)
    x = tf.constant(rng.normal(0.0, 1.0, (5, 3, 2)))
    gamma = tf.constant(rng.uniform(0.5, 2.0, 2))
    beta = tf.constant(rng.uniform(-1.0, 1.0, 2))
    # A fixed random projection so that the gradient of y is not trivially 0
    # (sum(y) is constant in x for normalized outputs).
    w = tf.constant(rng.normal(0.0, 1.0, (5, 3, 2)))

    def f(x, gamma, beta):
        y, _, _ = batch_norm(x, gamma, beta, tf.zeros(2, tf.float64),
                             tf.ones(2, tf.float64), training=True)
        return tf.reduce_sum(w * y * y + y)

    theoretical, numerical = tf.test.compute_gradient(f, [x, gamma, beta])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


def test_gradient_inference_mode_is_linear_in_x():
    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, _, _ = batch_norm(x, [2.0, 1.0], None, [0.0, 0.0], [3.0, 0.0],
                             training=False, epsilon=1.0)
    # dy/dx = gamma / sqrt(var + eps) = [2/2, 1/1].
    np.testing.assert_allclose(tape.gradient(y, x), [[1.0, 1.0], [1.0, 1.0]])


# --- graph mode ----------------------------------------------------------


def test_tensor_training_flag_selects_branch_in_one_trace():
    x = tf.constant([[1.0], [3.0]])

    @tf.function
    def f(training):
        return batch_norm(x, None, None, [0.0], [4.0], training=training,
                          momentum=0.5, epsilon=3.0)

    y_train, m_train, _ = f(tf.constant(True))
    y_infer, m_infer, _ = f(tf.constant(False))
    assert f.experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(y_train, [[-0.5], [0.5]])
    np.testing.assert_array_equal(m_train, [1.0])
    np.testing.assert_allclose(y_infer, [[1 / np.sqrt(7)], [3 / np.sqrt(7)]], rtol=1e-6)
    np.testing.assert_array_equal(m_infer, [0.0])


def test_jit_compile_matches_eager():
    rng = np.random.RandomState(7)
    x = tf.constant(rng.normal(0.0, 1.0, (8, 5, 5, 6)), tf.float32)
    params = [tf.constant(p, tf.float32) for p in random_params(6)]
    f = tf.function(lambda x: batch_norm(x, *params, training=True), jit_compile=True)
    for got, want in zip(f(x), batch_norm(x, *params, training=True)):
        np.testing.assert_allclose(got, want, rtol=F32_TOL, atol=F32_TOL)


# --- errors --------------------------------------------------------------

ONE = [1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"momentum": 1.5}, ValueError,
         "batch_norm: argument `momentum` must be a number in [0, 1]; received momentum=1.5."),
        ({"momentum": -0.1}, ValueError,
         "batch_norm: argument `momentum` must be a number in [0, 1]; received momentum=-0.1."),
        ({"epsilon": 0.0}, ValueError,
         "batch_norm: argument `epsilon` must be a finite number > 0; received epsilon=0.0."),
        ({"axis": 1.0}, TypeError,
         "batch_norm: argument `axis` must be an integer or a list of integers; received "
         "axis=1.0 of type float."),
        ({"axis": 2}, ValueError,
         "batch_norm: argument `axis` must be in [-2, 2) for an input of rank 2; received axis=2."),
        ({"training": "yes"}, TypeError,
         "batch_norm: argument `training` must be a bool or a scalar bool tensor; "
         "received 'yes' of type str."),
    ],
)
def test_argument_errors(kwargs, error, message):
    kwargs = {"training": True, **kwargs}
    with pytest.raises(error) as info:
        batch_norm(tf.ones([2, 2]), ONE, ONE, ONE, ONE, **kwargs)
    assert str(info.value) == message


def test_rank_one_input_error():
    with pytest.raises(ValueError) as info:
        batch_norm(tf.ones([3]), None, None, [0.0], [1.0], training=True)
    assert str(info.value) == (
        "batch_norm: expected an input of rank >= 2 (batch and channels); "
        "received rank 1."
    )


def test_integer_input_error():
    with pytest.raises(TypeError) as info:
        batch_norm(tf.ones([2, 2], tf.int32), None, None, ONE, ONE, training=True)
    assert str(info.value) == (
        "batch_norm: argument `x` must be a float16, bfloat16, float32 or "
        "float64 tensor; received dtype int32."
    )


def test_parameter_shape_error_names_the_argument():
    with pytest.raises(ValueError) as info:
        batch_norm(tf.ones([2, 2]), [1.0, 1.0, 1.0], None, ONE, ONE, training=True)
    assert str(info.value) == (
        "batch_norm: argument `gamma` must have shape (2,) to match the 2 "
        "channels of `x`; received shape (3,)."
    )


def test_affine_terms_follow_renorm_and_the_absent_terms():
    inv, g, b, r, d = (tf.constant([v], tf.float64) for v in (2.0, 3.0, 5.0, 0.5, 0.25))
    scale, offset = ops.affine_terms(inv, gamma=g, beta=b, r=r, d=d)
    assert (scale.numpy()[0], offset.numpy()[0]) == (2.0 * 0.5 * 3.0, 0.25 * 3.0 + 5.0)
    scale, offset = ops.affine_terms(inv, gamma=None, beta=None)
    assert scale.numpy()[0] == 2.0 and offset is None
