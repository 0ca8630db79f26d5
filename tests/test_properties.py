"""Property-based tests: `batch_norm` and `BatchNorm` against the float64
NumPy reference over random ranks (2-5), axes, shapes with size-1
dimensions, dtypes, value scales (1e-3 to 1e4) and offsets (up to 1e4
times the scale), in training and in inference, on the fused kernel
(`fused=True`) and on TF ops (`fused=False`).

Every tolerance comes from the float arithmetic (see `_y_bound`), so one
rule covers float16 inputs at 1e-3 and float32 inputs at 1e4 + N(0, 1).
Profiles: tests/hypothesis_profiles.py.
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_bn import BatchNorm
from keras_bn import batch_norm
from tests.hypothesis_profiles import examples
from tests.reference import np_batch_norm

HALF = (tf.float16, tf.bfloat16)
# Unit roundoff, half an ulp of 1: the relative error of one rounding.
ROUNDOFF = {tf.float16: 2.0**-11, tf.bfloat16: 2.0**-8, tf.float32: 2.0**-24,
            tf.float64: 2.0**-53}
# The smallest subnormal: below the normal range a rounding errs by up to
# this, whatever the value (a float16 y near 0, a momentum of 1e-127).
SUBNORMAL = {tf.float16: 2.0**-24, tf.bfloat16: 2.0**-133, tf.float32: 2.0**-149,
             tf.float64: 2.0**-1074}
# Errors may reach K roundoffs of the quantity they are measured against,
# times sqrt(n) for statistics summed over n values per channel (the
# rounding errors of a sum add up like a random walk). The worst seen in
# 14,000 examples was 2.5 sqrt(n), by the kernel's variance over 256 values.
K = 8
# float16 tops out at 65504: inputs stay below half of that.
FLOAT16_MAX_INPUT = 3e4


def _stat_dtype(dtype):
    return tf.float32 if dtype in HALF else dtype


@st.composite
def batches(draw, dtypes, steps=1):
    """`steps` batches of one shape and dtype: each `offset + scale * z`,
    z normal or small integers (ties, and whole channels of one value).

    Returns a dict: `xs` (tensors of `dtype`), `x64s` (the same values in
    float64: the reference gets the input after its rounding to `dtype`,
    so only the arithmetic is compared), `axis`, `scale`, `offset`,
    `fused` and `rng` (for parameters).
    """
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    dtype = draw(st.sampled_from(dtypes))
    scale = 10.0 ** draw(st.floats(-3.0, 4.0))
    ratio = draw(st.just(0.0) | st.builds(
        lambda sign, e: sign * 10.0**e, st.sampled_from([-1.0, 1.0]), st.floats(-1.0, 4.0)))
    if dtype == tf.float16:
        scale = min(scale, FLOAT16_MAX_INPUT / (abs(ratio) + 5.0))
    ties = draw(st.booleans())
    rng = np.random.RandomState(draw(st.integers(0, 2**31 - 1)))
    xs = []
    for _ in range(steps):
        if ties:
            z = rng.randint(-2, 3, shape).astype(np.float64)
        else:
            z = rng.standard_normal(shape).clip(-5.0, 5.0)
        xs.append(tf.cast(tf.constant(ratio * scale + scale * z), dtype))
    # The kernel has no float64 form; fused=True would raise (test_fused.py).
    use_kernel = draw(st.booleans()) and dtype != tf.float64
    return dict(xs=xs, x64s=[tf.cast(x, tf.float64).numpy() for x in xs], axis=axis,
                dtype=dtype, scale=scale, offset=ratio * scale, fused=use_kernel, rng=rng)


# epsilon from 1e-6 to 1, so that it often matters: var + eps with var
# from 1e-6 (scale 1e-3) up.
epsilons = st.just(1e-5) | st.builds(lambda e: 10.0**e, st.floats(-6.0, 0.0))


def _params(case, center, scale):
    """gamma, beta and moving statistics in the statistics dtype, the
    moving ones on the data's scale so that inference outputs are O(1)."""
    rng, s, o = case["rng"], case["scale"], case["offset"]
    channels = case["x64s"][0].shape[case["axis"]]
    dtype = _stat_dtype(case["dtype"]).as_numpy_dtype
    gamma = rng.uniform(0.25, 4.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.uniform(-2.0, 2.0, channels)
    mean = o + s * rng.uniform(-1.0, 1.0, channels)
    var = s**2 * rng.uniform(0.25, 4.0, channels)
    return (gamma.astype(dtype) if scale else None, beta.astype(dtype) if center else None,
            mean.astype(dtype), var.astype(dtype))


def _reduced(x64, axis):
    return tuple(i for i in range(x64.ndim) if i != axis % x64.ndim)


def _channel_max(x64, axis):
    return np.abs(x64).max(axis=_reduced(x64, axis))


def _sum_factor(x64, axis):
    """K sqrt(n): the roundoffs a statistic over n values per channel may err by."""
    return K * np.sqrt(x64.size // x64.shape[axis])


def _y_bound(x64, axis, gamma, beta, mean, var, epsilon, y_ref, dtype):
    """How far y may be from the float64 reference.

    Per channel, with M the largest |x| (or |mean|) and std = sqrt(var + eps):
    the statistics (float32 for half inputs) are K sqrt(n) roundoffs of M off,
    so `x - mean` is too and y by |gamma| / std times that; the conditioning
    of batch norm is M / std (about offset / scale). A variance error of a
    few roundoffs moves y by less (|x - mean| <= 2 M). Then y is rounded to
    its own dtype: a few roundoffs of |y|.
    """
    u_stat, u_out = ROUNDOFF[_stat_dtype(dtype)], ROUNDOFF[dtype]
    m = np.maximum(_channel_max(x64, axis), np.abs(mean))
    g = np.ones_like(m) if gamma is None else np.abs(gamma.astype(np.float64))
    b = np.zeros_like(m) if beta is None else np.abs(beta.astype(np.float64))
    per_channel = _sum_factor(x64, axis) * u_stat * (g * m / np.sqrt(var + epsilon) + b)
    shape = [1] * x64.ndim
    shape[axis] = -1
    rounding = K * (u_out * np.abs(y_ref) + SUBNORMAL[dtype])
    return np.reshape(per_channel, shape) + rounding


def _moving_bounds(x64, axis, old_mean, old_var, dtype):
    """Bounds for a moving statistic after one batch, in the statistics
    dtype: the batch mean errs by roundoffs of M, the batch variance by
    roundoffs of itself plus (roundoff * M)^2 (what a rounded mean leaves
    in a sum of squares), the update by roundoffs of the old value (also
    when it weighs nothing: `old + (batch - old) / 1` rounds at |old|)."""
    u, tiny = ROUNDOFF[_stat_dtype(dtype)], SUBNORMAL[_stat_dtype(dtype)]
    m = _channel_max(x64, axis)
    var = x64.var(axis=_reduced(x64, axis))
    k = _sum_factor(x64, axis)
    mean_bound = k * (u * (np.abs(old_mean) + m) + tiny)
    var_bound = k * (u * (old_var + var + u * m**2) + tiny)
    return mean_bound, var_bound


def _f64(t):
    return None if t is None else tf.cast(t, tf.float64).numpy()


def _assert_within(got, want, bound):
    np.testing.assert_array_less(np.abs(_f64(got) - want), bound)


def _assert_y_within(y, want, bound):
    """As `_assert_within`, where a y beyond its dtype's range may be +-inf
    (float16 overflows at 65504: e.g. inference with a tiny moving variance)."""
    got = _f64(y)
    overflow = (np.abs(want) > y.dtype.max) & np.isinf(got) & (np.sign(got) == np.sign(want))
    np.testing.assert_array_less(np.where(overflow, 0.0, np.abs(got - want)), bound)


def _check_op(case, center, scale, momentum, epsilon, training):
    x, x64, axis, dtype = case["xs"][0], case["x64s"][0], case["axis"], case["dtype"]
    gamma, beta, mm, mv = _params(case, center, scale)
    y, new_mean, new_var = batch_norm(x, gamma, beta, mm, mv, training=training,
                                      momentum=momentum, epsilon=epsilon, axis=axis,
                                      fused=case["fused"])
    assert y.dtype == dtype and y.shape == x.shape
    assert new_mean.dtype == _stat_dtype(dtype) and new_var.dtype == _stat_dtype(dtype)
    ref = [_f64(p) for p in (gamma, beta, mm, mv)]
    want_y, want_mean, want_var = np_batch_norm(
        x64, *ref, training=training, momentum=momentum, epsilon=epsilon, axis=axis)
    if training:
        mean_bound, var_bound = _moving_bounds(x64, axis, ref[2], ref[3], dtype)
        _assert_within(new_mean, want_mean, mean_bound)
        _assert_within(new_var, want_var, var_bound)
        assert np.all(new_var.numpy() >= 0)
        mean, var = x64.mean(axis=_reduced(x64, axis)), x64.var(axis=_reduced(x64, axis))
    else:
        # Inference hands back the moving statistics it was given, bit for bit.
        np.testing.assert_array_equal(new_mean.numpy(), mm)
        np.testing.assert_array_equal(new_var.numpy(), mv)
        mean, var = ref[2], ref[3]
    _assert_y_within(y, want_y, _y_bound(x64, axis, gamma, beta, mean, var, epsilon,
                                         want_y, dtype))


def _check_layer(case, center, scale, momentum, epsilon):
    """Training steps, each against the reference from the layer's moving
    statistics before it, then an inference call that changes nothing."""
    axis, dtype = case["axis"], case["dtype"]
    layer = BatchNorm(axis=axis, momentum=momentum, epsilon=epsilon, center=center,
                      scale=scale, fused=case["fused"], dtype=dtype.name)
    layer.build(case["xs"][0].shape)
    gamma, beta, mm, mv = _params(case, center, scale)
    own = [w for w in (gamma, beta, mm, mv) if w is not None]
    layer.set_weights(own + layer.get_weights()[len(own):])  # + num_batches_tracked
    ref_gamma, ref_beta = _f64(gamma), _f64(beta)
    for seen, (x, x64) in enumerate(zip(case["xs"], case["x64s"])):
        old_mean, old_var = _f64(layer.moving_mean), _f64(layer.moving_variance)
        # momentum=None: the cumulative average, old + (batch - old) / (seen + 1).
        weight = seen / (seen + 1.0) if momentum is None else momentum
        want_y, want_mean, want_var = np_batch_norm(
            x64, ref_gamma, ref_beta, old_mean, old_var, training=True,
            momentum=weight, epsilon=epsilon, axis=axis)
        y = layer(x, training=True)
        assert y.dtype == dtype
        mean_bound, var_bound = _moving_bounds(x64, axis, old_mean, old_var, dtype)
        _assert_within(layer.moving_mean, want_mean, mean_bound)
        _assert_within(layer.moving_variance, want_var, var_bound)
        mean, var = x64.mean(axis=_reduced(x64, axis)), x64.var(axis=_reduced(x64, axis))
        _assert_y_within(y, want_y, _y_bound(x64, axis, gamma, beta, mean, var, epsilon,
                                             want_y, dtype))
    state = [w.copy() for w in layer.get_weights()]
    moving_mean, moving_var = _f64(layer.moving_mean), _f64(layer.moving_variance)
    y = layer(x, training=False)
    for before, after in zip(state, layer.get_weights()):
        np.testing.assert_array_equal(after, before)
    want_y, _, _ = np_batch_norm(x64, ref_gamma, ref_beta, moving_mean, moving_var,
                                 training=False, epsilon=epsilon, axis=axis)
    _assert_y_within(y, want_y, _y_bound(x64, axis, gamma, beta, moving_mean, moving_var,
                                         epsilon, want_y, dtype))


# float64 is left out here: see test_float64_matches_reference_to_float64_precision.
DTYPES = (tf.float16, tf.bfloat16, tf.float32)


@settings(max_examples=examples(400))
@given(case=batches(DTYPES), center=st.booleans(), scale=st.booleans(),
       momentum=st.floats(0.0, 1.0), epsilon=epsilons, training=st.booleans())
def test_op_matches_float64_reference(case, center, scale, momentum, epsilon, training):
    _check_op(case, center, scale, momentum, epsilon, training)


@settings(max_examples=examples(120))
@given(case=st.integers(1, 3).flatmap(lambda steps: batches(DTYPES, steps)),
       center=st.booleans(), scale=st.booleans(),
       momentum=st.none() | st.floats(0.0, 1.0), epsilon=epsilons)
def test_layer_matches_float64_reference(case, center, scale, momentum, epsilon):
    _check_layer(case, center, scale, momentum, epsilon)


# --- float64 --------------------------------------------------------------


@settings(max_examples=examples(40))
@given(case=st.integers(1, 2).flatmap(lambda steps: batches((tf.float64,), steps)),
       center=st.booleans(), scale=st.booleans(), momentum=st.floats(0.0, 1.0),
       epsilon=epsilons, training=st.booleans())
def test_float64_matches_reference_to_float64_precision(case, center, scale, momentum,
                                                        epsilon, training):
    _check_op(case, center, scale, momentum, epsilon, training)
    _check_layer(case, center, scale, momentum, epsilon)


@pytest.mark.parametrize("training", [True, False])
def test_float64_epsilon_is_not_rounded_to_float32(training):
    # Batch {-1e-3, 1e-3} (mean 0, variance 1e-6) in training, moving
    # mean 0 and variance 1e-6 in inference: y = x / sqrt(1e-6 + 1e-5) in
    # both, where epsilon weighs 10/11 of the denominator.
    x = np.array([[-1e-3], [1e-3]])
    y, _, _ = batch_norm(x, None, None, np.zeros(1), np.full(1, 1e-6), training=training,
                         epsilon=1e-5)
    np.testing.assert_allclose(y, x / np.sqrt(1e-6 + 1e-5), rtol=1e-14, atol=0)


def test_float64_list_parameters_are_not_rounded_to_float32():
    # 0.1 is no float32 number: a float32 round trip moves it by 1.5e-8
    # relative. With moving variance + epsilon = 1, y = 0.1 * (x - 0.1):
    # 0 for x = 0.1 and 0.1 for x = 1.1.
    x = np.array([[0.1], [1.1]])
    y, _, _ = batch_norm(x, [0.1], [0.0], [0.1], [1.0 - 2.0**-17], training=False,
                         epsilon=2.0**-17)
    np.testing.assert_allclose(y, [[0.0], [0.1]], rtol=1e-15, atol=1e-17)
