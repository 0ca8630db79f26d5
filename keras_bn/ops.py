"""The math of batch normalization, as pure functions.

Statistics, merging them across parts, the normalization itself, the
moving-average rule, batch renormalization's stddev and correction, and
the training adjustment folded into gamma and beta. Nothing here owns a
variable or reads the device, the replica or XLA: the kernels and the
layer call these, and every formula lives here once.

Written in `keras.ops`, so that every Keras backend runs the same
formulas; on TensorFlow each op is the TensorFlow op it wraps, and the
TensorFlow kernels (`keras_bn.backend.tensorflow`) use them as they are.
"""

import collections
import math

import keras
import numpy as np

from keras import ops as K

_HALF_DTYPES = ("float16", "bfloat16")


def statistics_dtype(dtype):
    """float32 for half-precision inputs (their sums overflow), else `dtype`;
    a dtype name."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in _HALF_DTYPES else dtype


def static_value(t):
    """`t` as a NumPy array where it is known when tracing, else None.

    Each backend has its own notion: TensorFlow folds constants in a graph
    (tf.get_static_value), JAX's tracers have no value under jit, and a
    Python number or NumPy array is always known.
    """
    if isinstance(t, (int, float, np.ndarray, np.generic)):
        return np.asarray(t)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        return tf.get_static_value(t)
    if keras.config.backend() == "torch":
        import torch

        if torch.compiler.is_compiling():
            return None  # torch.compile's fake tensors: reading one breaks the graph
    try:
        return np.asarray(K.convert_to_numpy(t))
    except Exception:  # a tracer (JAX under jit)
        return None


def axes_of(axis):
    """The channel axes as a tuple: `(axis,)` for one, else `axis` itself."""
    return (axis,) if isinstance(axis, int) else tuple(axis)


def sizes_on(x, axis):
    """x's sizes on a sorted tuple of axes (a scalar tensor where unknown),
    what `per_channel` needs; None for a single axis, which doesn't."""
    if isinstance(axis, int):
        return None
    shape = K.shape(x)
    return [shape[a] for a in axis]


def per_channel(v, rank, axis, sizes=None):
    """Reshapes a (C,) vector so that it broadcasts along `axis`.

    `axis` is one non-negative axis, or a sorted tuple of them with their
    `sizes` (`sizes_on`): then C is their product and the vector runs over
    them row-major, the order of a multi-axis layer's weights.
    """
    axes = axes_of(axis)
    if axes == (rank - 1,):
        return v
    shape = [1] * rank
    for a, size in zip(axes, sizes or [-1]):
        shape[a] = size
    return K.reshape(v, shape)


def staged(reduce, x, axes):
    """`reduce` over `axes` in two stages: the trailing axes, then the first.

    Summing hundreds of thousands of float32 values in one pass lets the
    rounding error of the running sum grow with it (0.6 % of the variance
    for 256x32x32 values at an offset of 1e4); reducing each image first
    keeps every partial sum short.
    """
    if len(axes) > 1:
        x = reduce(x, axes[1:], keepdims=True)
    return reduce(x, axes[:1], keepdims=True)


def _mean(x, axes):
    return staged(K.mean, x, axes)


def _plain_two_pass(x, axes):
    mean = _mean(x, axes)
    return mean, _mean(K.square(x - mean), axes)


# A single reduced axis at least this long, and divisible by the stage,
# is summed in stages of _STAGE values (a free reshape [n] -> [n/32, 32]).
_STAGE = 32
_MIN_STAGED = 1024


def staged_moments(x, axes):
    """Keepdims mean and biased variance of x over `axes`: mean((x - m)^2).

    Every reduction is split in two (the inner axes, then the outer; one
    long axis as [n/32, 32]), so that no float32 running sum grows long.
    The plain second pass is exact only where the mean is not much larger
    than the spread: a mean off by d adds d^2 to the variance, and a
    float32 mean of data at 1e6 is off by up to 0.03 (half its last
    place). `moments_about` serves the other batches.
    """
    return _in_stages(_plain_two_pass, x, axes)


def one_long_axis(x, axes):
    """Whether x is reduced over one axis, long enough to be summed as
    [n/32, 32] (`staged_moments`)."""
    n = x.shape[axes[0]] if len(axes) == 1 else None
    return n is not None and n >= _MIN_STAGED and n % _STAGE == 0


def _in_stages(moments_of, x, axes):
    """`moments_of(view, view_axes)` -> keepdims statistics of x over
    `axes`, one long reduced axis viewed as [n/32, 32] (`staged_moments`)."""
    rank = len(x.shape)
    view, view_axes = x, list(axes)
    if len(axes) == 1:
        if not one_long_axis(x, axes):
            return moments_of(x, axes)
        a = axes[0]
        n = x.shape[a]
        # Unknown sizes (TensorFlow's dynamic batch) come as scalar tensors.
        shape = list(K.shape(x))
        view, view_axes = K.reshape(x, shape[:a] + [n // _STAGE, _STAGE] + shape[a + 1:]), [a, a + 1]
    stats = moments_of(view, view_axes)
    if view is not x:
        shape = K.shape(x)
        keep = [1 if i in axes else shape[i] for i in range(rank)]
        stats = tuple(K.reshape(t, keep) for t in stats)
    return stats


def corrected_moments(x, axes, shift):
    """Keepdims (mean of x - shift, variance of x) over `axes`, in stages
    (`staged_moments`): the sums of d = x - shift and of d^2 side by side,
    variance = mean(d^2) - mean(d)^2, floored at 0. XLA computes both in
    one fused loop each from x, with no copy of d.

    d is exact for values near the shift (Sterbenz) and the difference
    loses about float32's epsilon times 1 + mean(d)^2 / variance. With
    `shift` the mean of m of the n values (`sample_shift`) that factor is
    at most 1 + n / m whatever the data (the sample's values are part of
    the variance), and about 1 + 1/m for data in random order.

    `shifted_moments` in stages: the same formula, for TensorFlow's XLA,
    whose unstaged sums write their operands out in full (the JAX kernel's
    XLA keeps those in the loop, and a second stage cost it 5-10 %).
    """
    def moments_of(d, axes):
        # d * 0.5 (exact, as is the * 2): XLA's CPU backend hands a plain
        # sum of a difference to a library reduction that first writes d
        # out in full (a pass and a batch-sized buffer more); a product is
        # summed in the fused loop.
        mean = _mean(d * 0.5, axes) * 2.0
        return mean, K.relu(_mean(K.square(d), axes) - K.square(mean))
    return _in_stages(moments_of, x - shift, axes)


# A mean more than 10 standard deviations from zero: where float32 sums
# start to lose digits of the variance and of x - mean to the offset.
SHIFT_RATIO = 1e2


# The fewest values per channel a kernel's guard samples (the batch's first
# rows) to tell whether a channel is offset-dominated: enough to place its
# mean within a fraction of a standard deviation.
SHIFT_SAMPLE = 64


def offset_dominated(mean, variance):
    """Per channel, whether the mean exceeds sqrt(SHIFT_RATIO) standard
    deviations: the channels whose statistics need the data shifted
    towards zero first (`moments_about`, and the fused kernel's guard).
    """
    return K.square(mean) > SHIFT_RATIO * variance


def moments_about(x, axes, shift):
    """Keepdims (mean of x - shift, variance of x) over `axes`, in stages.

    `shift` is a per-channel value near the data (a first estimate of the
    mean, carrying no gradient). Batch norm doesn't change under a
    per-channel shift, x - shift is exact for values near it (Sterbenz),
    and the shifted data lie within a few standard deviations of zero, so
    their mean is small and so is its rounding error: the plain second pass
    needs no correction. The mean of x is `shift + mean`.
    """
    return staged_moments(x - shift, axes)


def sample_shift(x, axes):
    """Per channel, keepdims and carrying no gradient: the mean of x's first
    entries along the first of `axes` (at least SHIFT_SAMPLE values per
    channel), a slice rather than a pass over the batch. A shift for
    `shifted_moments`: within a fraction of a standard deviation of the
    batch mean for any offset."""
    a = axes[0]
    per_entry = 1
    for i in axes[1:]:
        per_entry *= x.shape[i] if x.shape[i] is not None else 1
    rows = -(-SHIFT_SAMPLE // max(1, per_entry))
    sample = x[(slice(None),) * a + (slice(0, rows),)]
    return K.stop_gradient(K.mean(sample, axis=axes, keepdims=True))


def shifted_moments(x, axes, shift):
    """Keepdims (mean of x - shift, variance of x) over `axes` in one pass:
    the sums of d = x - shift and of d^2 side by side (which XLA fuses into
    one read of x), and variance = mean(d^2) - mean(d)^2, floored at 0.

    One reduction per sum, not `staged`: XLA's and torch's reductions keep
    their own partial sums short (measured under JAX: 4e-8 to 2e-7
    relative error of the variance at 2.6e5 values per channel, staged or
    not), and a second stage cost XLA 5-10 % of a train step.

    With the shift near the data (`sample_shift`) mean(d) is small, and
    the difference of the two loses little (a relative error of about
    float32's epsilon times 1 + mean(d)^2 / variance); d itself is exact for
    values near the shift (Sterbenz), so no offset costs digits. Its
    derivative, to any order, is the variance's.
    """
    d = x - shift
    mean = K.mean(d, axis=axes, keepdims=True)
    return mean, K.relu(K.mean(K.square(d), axis=axes, keepdims=True) - K.square(mean))


def count_over(x, axes, dtype):
    """The number of values each statistic over `axes` of `x` is made of.

    A constant where those dimensions are known when tracing (every graph
    op costs tracing and optimization time in each batch norm of a model).
    """
    dims = [x.shape[i] for i in axes]
    if None not in dims:
        # In Python integers, from a list: NumPy, or a generator, would
        # break a torch.compile graph on its symbolic sizes.
        return K.convert_to_tensor(math.prod([int(d) for d in dims]), dtype)
    shape = K.shape(x)
    count = K.convert_to_tensor(1, dtype)
    for i in axes:
        count = count * K.cast(shape[i], dtype)
    return count


def moments(x, axis=-1):
    """Per-channel mean and biased variance of `x` over every axis but `axis`
    (an int, or a list of ints: then per position of those axes).

    Half-precision inputs are reduced in float32. The sums run in stages,
    on data shifted by a first estimate of their mean (`moments_about`),
    so that data on a large common offset (1e6 + N(0, 0.1) in float32)
    keep their variance; a mean of squares is never negative.

    Returns:
        (mean, variance), each of shape (C,): for several axes, C is the
        product of their sizes, row-major over them in increasing order.
    """
    x = K.convert_to_tensor(x)
    rank = len(x.shape)
    kept = {a % rank for a in axes_of(axis)}
    x = K.cast(x, statistics_dtype(x.dtype))
    axes = [i for i in range(rank) if i not in kept]
    shift = K.stop_gradient(staged_moments(x, axes)[0])
    mean, variance = moments_about(x, axes, shift)
    return K.reshape(shift + mean, [-1]), K.reshape(variance, [-1])


def scale(*, variance, gamma, epsilon):
    """Per channel, gamma / sqrt(variance + epsilon): the factor batch norm
    multiplies the centred input by."""
    # Converted straight to the variance's dtype: a cast goes through
    # float32 and would round epsilon for float64 statistics.
    a = K.rsqrt(variance + K.convert_to_tensor(epsilon, variance.dtype))
    return a if gamma is None else a * gamma


def scale_and_offset(*, mean, variance, gamma, beta, epsilon):
    """Per-channel a, b such that batch norm is `x * a + b`.

    a = `scale(...)`, b = beta - mean * a. This is the inference form that
    converters fold into the preceding layer.
    """
    a = scale(variance=variance, gamma=gamma, epsilon=epsilon)
    b = -mean * a
    if beta is not None:
        b = beta + b
    return a, b


def affine_terms(inv, *, gamma, beta, r=None, d=None):
    """The per-channel (scale, offset) of y = scale * (x - mean) + offset:
    gamma * inv * r and gamma * d + beta (renorm's r and d where given;
    None for an absent term). All broadcast alike; offset may be None."""
    scale = inv if r is None else inv * r
    scale = scale if gamma is None else scale * gamma
    offset = None if d is None else (d if gamma is None else d * gamma)
    if beta is not None:
        offset = beta if offset is None else offset + beta
    return scale, offset


def adjusted_gamma_and_beta(*, gamma, beta, adjust_scale, adjust_bias):
    """gamma' and beta' such that `gamma' * z + beta' = gamma * (adjust_scale
    * z + adjust_bias) + beta` for the normalized (and renorm-corrected) z.

    tf_keras's `adjustment` acts on z before gamma and beta; folded into
    them, any kernel that computes `gamma * z + beta` computes it. gamma or
    beta None means no scale or no offset. All (C,) vectors.
    """
    if gamma is None:
        return adjust_scale, adjust_bias if beta is None else adjust_bias + beta
    offset = gamma * adjust_bias
    return gamma * adjust_scale, offset if beta is None else offset + beta


def affine(x, *, a, b, axis):
    """`x * a + b` with per-channel (C,) `a` and `b` along `axis`, computed
    in the statistics dtype and returned in x's: batch norm's inference
    form, multiply then add, the order converters fold into the layer
    before it."""
    rank, sizes = len(x.shape), sizes_on(x, axis)
    y = (K.cast(x, a.dtype) * per_channel(a, rank, axis, sizes)
         + per_channel(b, rank, axis, sizes))
    return K.cast(y, x.dtype)


def normalize(x, *, mean, variance, gamma, beta, epsilon, axis):
    """Batch norm with given (C,) statistics, centred first:
    `(x - mean) * a + beta`, in the statistics dtype, returned in x's.

    Exact at any offset: x - mean loses nothing where x lies near the mean,
    while `affine`'s x * a + b rounds x * a at the offset's magnitude and
    then cancels it (4e-3 at 1e4 + N(0, 1) in float32). One elementwise op
    more than that form, and one that converters don't fold.
    """
    a = scale(variance=variance, gamma=gamma, epsilon=epsilon)
    rank, sizes = len(x.shape), sizes_on(x, axis)
    y = ((K.cast(x, a.dtype) - per_channel(mean, rank, axis, sizes))
         * per_channel(a, rank, axis, sizes))
    if beta is not None:
        y = y + per_channel(beta, rank, axis, sizes)
    return K.cast(y, x.dtype)


def weighted_moments(x, axes, weights):
    """Mean and variance over the positions where weights=1, about their
    weighted mean from a first pass (see `moments_about`).

    Returns:
        keepdims (count, shift, mean, variance), the mean relative to the
        shift. An all-masked reduction gives count 0, shift 0, mean 0 and
        variance 0 (divide_no_nan), which the bad-batch guard then refuses
        for the moving statistics.
    """
    count = K.sum(weights, axes, keepdims=True)

    def weighted_mean(t):
        return K.divide_no_nan(K.sum(weights * t, axes, keepdims=True), count)

    shift = K.stop_gradient(weighted_mean(x))
    shifted = x - shift
    mean = weighted_mean(shifted)
    return count, shift, mean, weighted_mean(K.square(shifted - mean))


class BatchStats(collections.namedtuple("BatchStats", ["count", "mean", "variance"])):
    """Per-channel (C,) statistics that moving averages follow.

    `count` is the number of values behind each statistic (per sub-batch
    with ghost batches): what an unbiased variance n / (n - 1) needs.
    """


def merge_moments(counts, means, variances):
    """Merges per-part statistics into those of the whole (Chan et al.).

    Args:
        counts, means, variances: [parts, C] tensors; a part with count 0
            is ignored (its mean and variance may be anything finite).

    Returns:
        (count, mean, variance) of the union, each (C,). The variance adds
        each part's variance to its squared distance from the common mean,
        weighted by count: exact, and free of the E[x^2] - E[x]^2
        cancellation of summing raw squares.
    """
    count = K.sum(counts, 0)
    mean = K.divide_no_nan(K.sum(counts * means, 0), count)
    spread = variances + K.square(means - mean)
    variance = K.divide_no_nan(K.sum(counts * spread, 0), count)
    return count, mean, variance


def pooled_moments(counts, means, variances):
    """Count-weighted means of per-part means and of per-part variances.

    The variance here is the within-part one (each part about its own
    mean), which is what parts that normalize with their own statistics
    have seen.
    """
    count = K.sum(counts, 0)
    mean = K.divide_no_nan(K.sum(counts * means, 0), count)
    variance = K.divide_no_nan(K.sum(counts * variances, 0), count)
    return count, mean, variance


def update_moving(moving, batch_value, momentum):
    """The exponential moving average: momentum * moving + (1 - momentum) * batch.

    `momentum` may be a tensor: `cumulative_momentum` turns the same rule
    into a plain mean of every batch value.
    """
    return momentum * moving + (1.0 - momentum) * batch_value


def cumulative_momentum(batches_seen, dtype):
    """The momentum n / (n + 1) after n earlier batches, with which the
    moving average is the mean of all batch values so far (PyTorch's
    momentum=None): moving + (batch - moving) / (n + 1)."""
    seen = K.cast(batches_seen, dtype)
    return seen / (seen + 1.0)


def unbiased_variance(variance, count):
    """n / (n - 1) * variance, the unbiased estimate PyTorch keeps in its
    running variance; infinite for n = 1, which the bad-batch guard refuses."""
    return variance * count / (count - 1.0)


def is_usable(stats):
    """A scalar bool: the batch statistics are finite and come from at least
    one value per channel (what the moving statistics may follow)."""
    finite = K.all(K.isfinite(K.stack([stats.mean, stats.variance])))
    count = static_value(stats.count)
    if count is not None and (count > 0).all():
        return finite  # known when tracing: no op to check it
    return K.logical_and(finite, K.all(stats.count > 0))


def moving_target(stats, *, unbiased=False, guard=True):
    """What the moving statistics follow for this batch, and whether they may.

    Returns:
        (mean, variance, accepted): the batch mean and the biased variance,
        or the unbiased one; `accepted` is a scalar bool, False for a batch
        the bad-batch guard refuses (non-finite statistics, no values, or
        an unbiased variance of one value), always True without the guard.
    """
    variance = unbiased_variance(stats.variance, stats.count) if unbiased else stats.variance
    if not guard:
        return stats.mean, variance, K.convert_to_tensor(True)
    return stats.mean, variance, is_usable(BatchStats(stats.count, stats.mean, variance))


def kept_unless(accepted, old, new):
    """`new` where the batch is accepted, else `old` to the bit.

    A select rather than a conditional: one trace, and the refused value is
    the old tensor itself, not a recomputation of it.
    """
    return K.where(accepted, new, old)


def stddev_of(*, variance, epsilon):
    """sqrt(variance + epsilon): the standard deviation batch norm divides
    by, which batch renormalization keeps moving averages of."""
    return K.sqrt(variance + epsilon)


def variance_of(*, stddev, epsilon):
    """stddev**2 - epsilon, the inverse of `stddev_of`, floored at 0: a
    moving stddev starts as the square root of the initial variance, without
    epsilon (Keras's), so its square may lie below epsilon."""
    return K.relu(K.square(stddev) - epsilon)


def renorm_correction(*, mean, variance, renorm_mean, renorm_stddev, epsilon, bounds):
    """Batch renormalization's r and d (Ioffe, 2017, Algorithm 1).

    r = sigma_batch / sigma_renorm and d = (mu_batch - mu_renorm) /
    sigma_renorm, clipped to [rmin, rmax] and [-dmax, dmax] by whichever
    `bounds` are given; sigma_renorm is floored at sqrt(epsilon), the
    smallest a batch stddev can be, since early in training it may be tiny.
    The caller treats both as constants for the gradient.
    """
    epsilon = K.convert_to_tensor(epsilon, variance.dtype)
    renorm_stddev = K.maximum(renorm_stddev, K.sqrt(epsilon))
    r = stddev_of(variance=variance, epsilon=epsilon) / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    if "rmin" in bounds:
        r = K.maximum(r, bounds["rmin"])
    if "rmax" in bounds:
        r = K.minimum(r, bounds["rmax"])
    if "dmax" in bounds:
        d = K.clip(d, -bounds["dmax"], bounds["dmax"])
    return r, d
