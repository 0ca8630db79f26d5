"""The math of batch normalization, as pure functions.

Statistics, merging them across parts, the normalization itself, the
moving-average rule and batch renormalization's correction. Nothing here
owns a variable or reads the device, the replica or XLA: the kernels
(`fused_kernel`, `tf_ops_kernel`) and the layer call these, and every
formula lives here once.
"""

import collections

import tensorflow as tf

_HALF_DTYPES = (tf.float16, tf.bfloat16)


def statistics_dtype(dtype):
    """float32 for half-precision inputs (their sums overflow), else `dtype`."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in _HALF_DTYPES else dtype


def axes_of(axis):
    """The channel axes as a tuple: `(axis,)` for one, else `axis` itself."""
    return (axis,) if isinstance(axis, int) else tuple(axis)


def sizes_on(x, axis):
    """x's sizes on a sorted tuple of axes (a scalar tensor where unknown),
    what `per_channel` needs; None for a single axis, which doesn't."""
    if isinstance(axis, int):
        return None
    return [tf.shape(x)[a] if x.shape[a] is None else x.shape[a] for a in axis]


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
    return tf.reshape(v, shape)


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
    return staged(tf.reduce_mean, x, axes)


def _two_pass(x, axes):
    """Corrected two-pass moments: mean((x - m)^2) - mean(x - m)^2.

    The second term removes the rounding error of `m` itself, which a long
    unstaged float32 sum leaves large when the data sit on a big offset.
    """
    mean = _mean(x, axes)
    centered = x - tf.stop_gradient(mean)
    residual = _mean(centered, axes)
    variance = _mean(tf.square(centered), axes)
    variance = tf.maximum(variance - tf.square(residual), 0.0)
    # The residual corrects the mean's value, not its gradient (which
    # `mean` already carries in full).
    return mean + tf.stop_gradient(residual), variance


def _plain_two_pass(x, axes):
    mean = _mean(x, axes)
    return mean, _mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes)


# A single reduced axis at least this long, and divisible by the stage,
# is summed in stages of _STAGE values (a free reshape [n] -> [n/32, 32]).
_STAGE = 32
_MIN_STAGED = 1024


def staged_moments(x, axes, short_axis_plain=False):
    """Keepdims mean and biased variance of x over `axes`, in stages.

    Every reduction is split in two (the inner axes, then the outer), so no
    float32 running sum grows long: the mean is then accurate enough that a
    plain second pass, mean((x - m)^2), needs no correction. That is one
    reduction fewer than `_two_pass`, which serves when nothing can be
    staged (one short or odd-length axis), or, with `short_axis_plain`
    (under XLA, which sums a short axis accurately and pays a pass for the
    correction), a plain two-pass. Figures: benchmarks/README.md, "Staged
    statistics".
    """
    rank = x.shape.rank
    view, view_axes = x, list(axes)
    if len(axes) == 1:
        a = axes[0]
        n = x.shape[a]
        if n is None or n < _MIN_STAGED or n % _STAGE:
            if short_axis_plain and n is not None and n < _MIN_STAGED:
                return _plain_two_pass(x, axes)
            return _two_pass(x, axes)
        shape = tf.concat([tf.shape(x)[:a], [n // _STAGE, _STAGE], tf.shape(x)[a + 1:]], 0)
        view, view_axes = tf.reshape(x, shape), [a, a + 1]
    mean, variance = _plain_two_pass(view, view_axes)
    if view is not x:
        shape = tf.shape(x)
        keep = tf.stack([1 if i in axes else shape[i] for i in range(rank)])
        mean, variance = tf.reshape(mean, keep), tf.reshape(variance, keep)
    return mean, variance


def count_over(x, axes, dtype):
    """The number of values each statistic over `axes` of `x` is made of.

    A constant where those dimensions are known when tracing (every graph
    op costs tracing and optimization time in each batch norm of a model).
    """
    dims = [x.shape[i] for i in axes]
    if None not in dims:
        count = 1
        for d in dims:
            count *= d
        return tf.constant(count, dtype)
    return tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), dtype)


def moments(x, axis=-1):
    """Per-channel mean and biased variance of `x` over every axis but `axis`
    (an int, or a list of ints: then per position of those axes).

    Half-precision inputs are reduced in float32. Sums run in stages (see
    `_staged_moments`) or, where nothing can be staged, as a corrected two-
    pass estimate, so that data on a large common offset (1e4 + N(0, 1) in
    float32) keep their variance. The variance is clamped at 0 because
    rounding may still leave a tiny negative.

    Returns:
        (mean, variance), each of shape (C,): for several axes, C is the
        product of their sizes, row-major over them in increasing order.
    """
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    kept = {a % rank for a in axes_of(axis)}
    x = tf.cast(x, statistics_dtype(x.dtype))
    axes = [i for i in range(rank) if i not in kept]
    mean, variance = staged_moments(x, axes)
    return tf.reshape(mean, [-1]), tf.reshape(variance, [-1])


def scale(variance, gamma, epsilon):
    """Per channel, gamma / sqrt(variance + epsilon): the factor batch norm
    multiplies the centred input by."""
    # tf.constant, not tf.cast: a cast goes through float32 and would round
    # epsilon for float64 statistics.
    a = tf.math.rsqrt(variance + tf.constant(epsilon, variance.dtype))
    return a if gamma is None else a * gamma


def scale_and_offset(mean, variance, gamma, beta, epsilon):
    """Per-channel a, b such that batch norm is `x * a + b`.

    a = `scale(...)`, b = beta - mean * a. This is the inference form that
    converters fold into the preceding layer.
    """
    a = scale(variance, gamma, epsilon)
    b = -mean * a
    if beta is not None:
        b = beta + b
    return a, b


def affine(x, a, b, axis):
    """`x * a + b` with per-channel (C,) `a` and `b` along `axis`, computed
    in the statistics dtype and returned in x's: batch norm's inference
    form, multiply then add, the order converters fold into the layer
    before it."""
    rank, sizes = x.shape.rank, sizes_on(x, axis)
    y = (tf.cast(x, a.dtype) * per_channel(a, rank, axis, sizes)
         + per_channel(b, rank, axis, sizes))
    return tf.cast(y, x.dtype)


def normalize(x, mean, variance, gamma, beta, epsilon, axis):
    """Batch norm with given (C,) statistics, in the inference form."""
    a, b = scale_and_offset(mean, variance, gamma, beta, epsilon)
    return affine(x, a, b, axis)


def weighted_moments(x, axes, weights):
    """Two-pass corrected mean and variance over positions where weights=1.

    Returns keepdims (count, mean, variance); an all-masked reduction gives
    count 0 and mean 0, variance 0 (divide_no_nan), which the bad-batch
    guard then refuses for the moving statistics.
    """
    total = tf.reduce_sum(weights * x, axes, keepdims=True)
    count = tf.reduce_sum(weights, axes, keepdims=True)
    mean = tf.math.divide_no_nan(total, count)
    centered = (x - mean) * weights
    residual = tf.math.divide_no_nan(tf.reduce_sum(centered, axes, keepdims=True), count)
    square = tf.math.divide_no_nan(
        tf.reduce_sum(tf.square(centered), axes, keepdims=True), count)
    variance = tf.maximum(square - tf.square(residual), 0.0)
    return count, mean + residual, variance


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
    count = tf.reduce_sum(counts, 0)
    mean = tf.math.divide_no_nan(tf.reduce_sum(counts * means, 0), count)
    spread = variances + tf.square(means - mean)
    variance = tf.math.divide_no_nan(tf.reduce_sum(counts * spread, 0), count)
    return count, mean, variance


def pooled_moments(counts, means, variances):
    """Count-weighted means of per-part means and of per-part variances.

    The variance here is the within-part one (each part about its own
    mean), which is what parts that normalize with their own statistics
    have seen.
    """
    count = tf.reduce_sum(counts, 0)
    mean = tf.math.divide_no_nan(tf.reduce_sum(counts * means, 0), count)
    variance = tf.math.divide_no_nan(tf.reduce_sum(counts * variances, 0), count)
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
    seen = tf.cast(batches_seen, dtype)
    return seen / (seen + 1.0)


def unbiased_variance(variance, count):
    """n / (n - 1) * variance, the unbiased estimate PyTorch keeps in its
    running variance; infinite for n = 1, which the bad-batch guard refuses."""
    return variance * count / (count - 1.0)


def is_usable(stats):
    """A scalar bool: the batch statistics are finite and come from at least
    one value per channel (what the moving statistics may follow)."""
    finite = tf.reduce_all(tf.math.is_finite(tf.stack([stats.mean, stats.variance])))
    count = tf.get_static_value(stats.count)
    if count is not None and (count > 0).all():
        return finite  # known when tracing: no op to check it
    return tf.logical_and(finite, tf.reduce_all(stats.count > 0))


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
        return stats.mean, variance, tf.constant(True)
    return stats.mean, variance, is_usable(BatchStats(stats.count, stats.mean, variance))


def kept_unless(accepted, old, new):
    """`new` where the batch is accepted, else `old` to the bit.

    tf.where rather than tf.cond: one trace, and the refused value is the
    old tensor itself, not a recomputation of it.
    """
    return tf.where(accepted, new, old)


def renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, bounds):
    """Batch renormalization's r and d (Ioffe, 2017, Algorithm 1).

    r = sigma_batch / sigma_renorm and d = (mu_batch - mu_renorm) /
    sigma_renorm, clipped to [rmin, rmax] and [-dmax, dmax] by whichever
    `bounds` are given; sigma_renorm is floored at sqrt(epsilon), the
    smallest a batch stddev can be, since early in training it may be tiny.
    The caller treats both as constants for the gradient.
    """
    epsilon = tf.constant(epsilon, variance.dtype)
    renorm_stddev = tf.maximum(renorm_stddev, tf.sqrt(epsilon))
    r = tf.sqrt(variance + epsilon) / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    if "rmin" in bounds:
        r = tf.maximum(r, bounds["rmin"])
    if "rmax" in bounds:
        r = tf.minimum(r, bounds["rmax"])
    if "dmax" in bounds:
        d = tf.clip_by_value(d, -bounds["dmax"], bounds["dmax"])
    return r, d
