"""Pure batch-normalization math: statistics, normalization, moving averages.

Nothing here owns a variable. `batch_norm` is the public op, built from
`normalize_batch` (training) and `normalize_inference`, which the layer in
`keras_bn.layer` calls directly before assigning the moving statistics with
the update rules below. Every formula lives in this module once.
"""

import collections
import numbers

import tensorflow as tf

from keras_bn import distributed
from keras_bn import fused as fused_kernels

_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
_HALF_DTYPES = (tf.float16, tf.bfloat16)


def check_momentum(momentum, owner="batch_norm"):
    """Raises ValueError unless `momentum` is a real number in [0, 1]."""
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, numbers.Real)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(
            f"{owner}: argument `momentum` must be a number in [0, 1]; "
            f"received momentum={momentum!r}."
        )
    return float(momentum)


def check_epsilon(epsilon, owner="batch_norm"):
    """Raises ValueError unless `epsilon` is a finite real number > 0."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, numbers.Real)
        or not 0.0 < epsilon < float("inf")
    ):
        raise ValueError(
            f"{owner}: argument `epsilon` must be a finite number > 0; "
            f"received epsilon={epsilon!r}."
        )
    return float(epsilon)


def check_axis(axis, owner="batch_norm"):
    """Raises ValueError unless `axis` is a single integer (not a bool)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(
            f"{owner}: argument `axis` must be a single integer; "
            f"received axis={axis!r} of type {type(axis).__name__}."
        )
    return int(axis)


def channel_axis(rank, axis, owner="batch_norm"):
    """Returns `axis` as a non-negative index into a shape of `rank`."""
    if rank is None:
        raise ValueError(
            f"{owner}: the input rank must be known; received an input of "
            "unknown rank."
        )
    if rank < 2:
        raise ValueError(
            f"{owner}: expected an input of rank >= 2 (batch and channels); "
            f"received rank {rank}."
        )
    if not -rank <= axis < rank:
        raise ValueError(
            f"{owner}: argument `axis` must be in [{-rank}, {rank}) for an "
            f"input of rank {rank}; received axis={axis}."
        )
    return axis % rank


def known_channels(input_shape, axis, owner):
    """The channel count on `axis` of a build-time shape; ValueError if unknown."""
    input_shape = tuple(input_shape)
    channels = input_shape[channel_axis(len(input_shape), axis, owner)]
    if channels is None:
        raise ValueError(
            f"{owner}: the channel dimension (axis {axis}) of the input must "
            f"be known at build time; received input shape {input_shape}."
        )
    return int(channels)


def statistics_dtype(dtype):
    """float32 for half-precision inputs (their sums overflow), else `dtype`."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in _HALF_DTYPES else dtype


def per_channel(v, rank, axis):
    """Reshapes a (C,) vector so that it broadcasts along `axis`."""
    if axis == rank - 1:
        return v
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(v, shape)


def _staged(reduce, x, axes):
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
    return _staged(tf.reduce_mean, x, axes)


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


def _staged_moments(x, axes):
    """Keepdims mean and biased variance of x over `axes`, in stages.

    Every reduction is split in two (the inner axes, then the outer), so no
    float32 running sum grows long: the mean is then accurate enough that a
    plain second pass, mean((x - m)^2), needs no correction. That is one
    reduction fewer than `_two_pass`, which serves when nothing can be
    staged (one short or odd-length axis). Measured on CPU at 1e4 + N(0, 1),
    256x32x32 values a channel: variance error 5e-7 (tf.nn.moments: 162),
    and under XLA faster than tf.nn.moments (10 ms vs 34 ms for
    64x32x32x64 NHWC); one-pass sums of (x - shift) and its square were
    measured too and are not faster on CPU, with or without XLA.
    """
    rank = x.shape.rank
    view, view_axes = x, list(axes)
    if len(axes) == 1:
        a = axes[0]
        n = x.shape[a]
        if n is None or n < _MIN_STAGED or n % _STAGE:
            if fused_kernels.in_xla_context() and n is not None and n < _MIN_STAGED:
                # XLA sums a short axis accurately (4.5e-7 relative at
                # 1e4 + N(0, 1), 256 values) and the correction's extra
                # reduction costs it a pass.
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


def moments(x, axis=-1):
    """Per-channel mean and biased variance of `x` over every axis but `axis`.

    Half-precision inputs are reduced in float32. Sums run in stages (see
    `_staged_moments`) or, where nothing can be staged, as a corrected two-
    pass estimate, so that data on a large common offset (1e4 + N(0, 1) in
    float32) keep their variance. The variance is clamped at 0 because
    rounding may still leave a tiny negative.

    Returns:
        (mean, variance), each of shape (C,).
    """
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    axis = channel_axis(rank, check_axis(axis, "moments"), "moments")
    x = tf.cast(x, statistics_dtype(x.dtype))
    axes = [i for i in range(rank) if i != axis]
    mean, variance = _staged_moments(x, axes)
    return tf.reshape(mean, [-1]), tf.reshape(variance, [-1])


def scale_and_offset(mean, variance, gamma, beta, epsilon):
    """Per-channel a, b such that batch norm is `x * a + b`.

    a = gamma / sqrt(variance + epsilon), b = beta - mean * a. This is the
    inference form that converters fold into the preceding layer.
    """
    # tf.constant, not tf.cast: a cast goes through float32 and would round
    # epsilon for float64 statistics.
    epsilon = tf.constant(epsilon, variance.dtype)
    a = tf.math.rsqrt(variance + epsilon)
    if gamma is not None:
        a = a * gamma
    b = -mean * a
    if beta is not None:
        b = beta + b
    return a, b


def _weighted_moments(x, axes, weights):
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


def _replica_moments(ctx, count, mean, variance, merge):
    """Gathers every replica's (C,) count, mean and variance and merges them."""
    # An empty replica batch has NaN statistics; its count of 0 drops it.
    mean = tf.where(count > 0, mean, 0.0)
    variance = tf.where(count > 0, variance, 0.0)
    rows = distributed.gather_rows(ctx, tf.stack([count, mean, variance]))
    return merge(rows[:, 0], rows[:, 1], rows[:, 2])


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
    return tf.logical_and(
        tf.reduce_all(tf.math.is_finite(stats.mean))
        & tf.reduce_all(tf.math.is_finite(stats.variance)),
        tf.reduce_all(stats.count > 0),
    )


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


def _as_vector(value, name, channels, dtype):
    if value is None:
        return None
    value = tf.convert_to_tensor(value, dtype_hint=dtype)
    if not value.dtype.is_floating:
        raise TypeError(
            f"batch_norm: argument `{name}` must be floating-point; received "
            f"dtype {value.dtype.name}."
        )
    if value.shape.rank != 1 or (
        channels is not None
        and value.shape[0] is not None
        and value.shape[0] != channels
    ):
        raise ValueError(
            f"batch_norm: argument `{name}` must have shape ({channels},) to "
            f"match the {channels} channels of `x`; received shape "
            f"{tuple(value.shape)}."
        )
    return tf.cast(value, dtype)


def _attached(value, x, vjp):
    """`value`, as a function of `x` whose derivative is `vjp`.

    The backward pass below is built from the batch statistics of the
    forward pass. Written as constants, an outer tape would see them as
    independent of x and get every second derivative wrong (Hessian-vector
    products, gradient penalties); attached this way it differentiates
    through them exactly, at no cost to a first-order step.
    """
    @tf.custom_gradient
    def attach(x):
        return tf.identity(value), vjp
    return attach(x)


def _general_train(x, gamma, beta, epsilon, axis, *, replica_ctx=None,
                   virtual_batch_size=None, mask=None, correction=None):
    """Training-mode batch norm from TF ops, with a lean custom gradient.

    The backward pass keeps only x, the mean and the inverse std (not the
    normalized tensor) and needs two per-channel sums, sum(dy) and
    sum(dy * (x - mean)), reduced side by side so that XLA fuses them into
    one pass over dy and x. Gradients of any order are exact: the backward
    pass reads the statistics through `_attached`, which gives an outer tape
    their derivatives with respect to x.

    Args:
        replica_ctx: statistics of the global batch across replicas (one
            all-reduce forward, one backward, each of a few (C,) vectors).
        virtual_batch_size: statistics per consecutive sub-batch of this
            many examples along axis 0 (ghost batch normalization).
        mask: bool tensor broadcastable to x: positions that count in the
            statistics (all positions are normalized).
        correction: `f(mean, variance, broadcast) -> (r, d)` giving batch
            renormalization's factors (constants for the gradient):
            y = gamma * (x_hat * r + d) + beta. `mean` and `variance` keep
            their reduced dimensions; `broadcast` reshapes a (C,) vector
            to match them.

    Returns:
        (y, BatchStats); y in x's dtype, statistics in
        `statistics_dtype(x.dtype)` carrying no gradient: per channel, or
        with ghost batches the mean over sub-batches.
    """
    stat_dtype = statistics_dtype(x.dtype)
    has_gamma, has_beta = gamma is not None, beta is not None
    rank = x.shape.rank
    x_shape = tf.shape(x)
    weights = None
    if mask is not None:
        # Broadcast in full: a mask of size 1 along a reduced axis still
        # counts every position there.
        weights = tf.broadcast_to(tf.cast(mask, stat_dtype), x_shape)
    if virtual_batch_size is not None:
        # [N, ...] -> [G, v, ...]: sub-batch g holds examples g*v .. g*v+v-1.
        ghost_shape = tf.concat([[-1, virtual_batch_size], x_shape[1:]], 0)
        view = lambda t: tf.reshape(t, ghost_shape)  # noqa: E731
        kept = {0, axis + 1}
        rank += 1
        axis += 1
    else:
        view = lambda t: t  # noqa: E731
        kept = {axis}
    axes = [i for i in range(rank) if i not in kept]
    w = None if weights is None else view(weights)

    def stats_of(xs):
        if w is not None:
            return _weighted_moments(xs, axes, w)
        mean, variance = _staged_moments(xs, axes)
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(xs), axes)), stat_dtype)
        return tf.fill(tf.shape(mean), count), mean, variance

    def broadcast(v):
        return v if v.shape.rank == rank else per_channel(v, rank, axis)

    def total(t):
        """A per-channel cotangent summed over replicas: every replica's
        loss depends on this replica's x through the global statistics."""
        return t if replica_ctx is None else distributed.all_sum(replica_ctx, t)

    def masked(t):
        return t if w is None else t * w

    @tf.custom_gradient
    def forward(x, *params):
        xs = view(tf.cast(x, stat_dtype))
        count, mean, variance = stats_of(xs)
        if replica_ctx is not None:
            shape = tf.shape(mean)
            count, mean, variance = _replica_moments(
                replica_ctx, tf.reshape(count, [-1]), tf.reshape(mean, [-1]),
                tf.reshape(variance, [-1]), merge_moments)
            count, mean, variance = (tf.reshape(t, shape) for t in (count, mean, variance))
        mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
        inv = tf.math.rsqrt(variance + tf.constant(epsilon, stat_dtype))
        n = tf.maximum(count, 1.0)
        r = d = None
        if correction is not None:
            r, d = (tf.stop_gradient(t) for t in correction(mean, variance, broadcast))

        # The statistics as functions of x, for the backward pass (see
        # `_attached`); each derivative reads the others the same way, so
        # every order is exact.
        def xs_of(x):
            return _attached(xs, x, lambda g: tf.cast(tf.reshape(g, x_shape), x.dtype))

        def mean_of(x):
            # d mean / dx = w / n, spread over every position that counts.
            return _attached(mean, x, lambda g: to_x(
                masked(tf.broadcast_to(total(g) / n, tf.shape(xs)))))

        def inv_of(x):
            def vjp(g):
                # d inv = -inv^3 / 2 * d var, d var / dx = 2 w (x - mean) / n
                inv_x = inv_of(x)
                return to_x(masked(-total(g) * inv_x * inv_x * inv_x / n
                                   * (xs_of(x) - mean_of(x))))
            return _attached(inv, x, vjp)

        def to_x(t):
            return tf.cast(tf.reshape(t, x_shape), x.dtype)

        def affine(inv, params):
            g = broadcast(params[0]) if has_gamma else None
            b = broadcast(params[-1]) if has_beta else None
            scale = inv if r is None else inv * r
            scale = scale if g is None else scale * g
            offset = None if d is None else (d if g is None else d * g)
            if b is not None:
                offset = b if offset is None else offset + b
            return scale, offset

        scale, offset = affine(inv, params)
        # With batch statistics the input is centred first: x * a + b would
        # cancel two large terms when |mean| >> std and lose digits.
        y = (xs - mean) * scale
        if offset is not None:
            y = y + offset

        def backward(dy, *_):
            dy = view(tf.cast(dy, stat_dtype))
            inv_x = inv_of(x)
            centered = xs_of(x) - mean_of(x)
            scale, _ = affine(inv_x, params)
            sum_dy = _staged(tf.reduce_sum, dy, axes)
            sum_dy_centered = _staged(tf.reduce_sum, dy * centered, axes)
            # gamma and beta get this replica's share (the optimizer sums
            # replicas); x sees every replica's outputs through the stats.
            grads = []
            if has_gamma:
                # multiply_no_nan: an empty batch has sums of 0 but a NaN
                # inverse std, and its gradient is 0, not NaN.
                grad_gamma = tf.math.multiply_no_nan(
                    inv_x if r is None else inv_x * r, sum_dy_centered)
                if d is not None:
                    grad_gamma = grad_gamma + tf.math.multiply_no_nan(d, sum_dy)
                grads.append(_to_vector(grad_gamma, kept, axis))
            if has_beta:
                grads.append(_to_vector(sum_dy, kept, axis))
            if replica_ctx is not None:
                sums = distributed.all_sum(
                    replica_ctx, tf.stack([sum_dy, sum_dy_centered]))
                sum_dy, sum_dy_centered = sums[0], sums[1]
            dx = scale * (dy - masked(
                sum_dy / n + centered * (inv_x * inv_x) * (sum_dy_centered / n)))
            return (to_x(dx), *grads)

        y = tf.cast(tf.reshape(y, x_shape), x.dtype)
        return (y, count, mean, variance), backward

    params = [p for p in (gamma, beta) if p is not None]
    y, count, mean, variance = forward(x, *params)
    # Moving statistics follow the mean over sub-batches with ghost batches.
    count, mean, variance = (
        _to_vector(t, kept, axis, tf.reduce_mean) for t in (count, mean, variance))
    return y, BatchStats(count, mean, variance)


def _to_vector(t, kept, axis, reduce=tf.reduce_sum):
    """A keepdims statistic -> (C,), reducing a ghost-batch axis 0 if any."""
    if 0 in kept and axis != 0:
        t = reduce(t, 0, keepdims=True)
    return tf.reshape(t, [-1])


def normalize_inference(x, mean, variance, gamma, beta, *, epsilon, axis,
                        fused=None):
    """Inference-mode normalization with given statistics.

    The fused kernel for 4-D inputs where `fused` and the device choose it,
    else TF ops as `x * a + b`, the form converters fold into the preceding
    layer.
    """
    # By default only 4-D inputs take the kernel in inference: for other
    # ranks its reshapes keep TFLite from folding the batch norm into the
    # preceding Dense or convolution layer, which matters more to a served
    # model than the kernel's one pass over x instead of two.
    if (fused or x.shape.rank == 4) and _choose_fused(fused, x, axis, epsilon, False):
        return fused_kernels.fused_infer(x, gamma, beta, mean, variance, epsilon, axis)
    rank = x.shape.rank
    a, b = scale_and_offset(mean, variance, gamma, beta, epsilon)
    xs = tf.cast(x, statistics_dtype(x.dtype))
    y = xs * per_channel(a, rank, axis) + per_channel(b, rank, axis)
    return tf.cast(y, x.dtype)


def normalize_batch(x, gamma, beta, *, epsilon, axis, fused=None,
                    synchronized=False, virtual_batch_size=None, mask=None,
                    correction=None):
    """Training-mode normalization with batch statistics; no moving update.

    Arguments as in `batch_norm` (already checked and converted: `axis`
    non-negative, vectors in the statistics dtype), plus those of
    `_general_train`. The fused kernel serves only the plain case.

    Returns:
        (y, BatchStats) where the statistics are those the moving averages
        should follow: in a multi-replica step, the same on every replica.
    """
    replica_ctx = distributed.replica_context()
    synchronize = bool(synchronized) and replica_ctx is not None
    extras = synchronize or virtual_batch_size is not None or mask is not None or (
        correction is not None)
    if extras:
        if fused:
            raise ValueError(
                "batch_norm: fused=True, but the kernel computes plain "
                "per-replica statistics only (no synchronized, ghost-batch, "
                "masked or renormalized ones)."
            )
        y, stats = _general_train(
            x, gamma, beta, epsilon, axis,
            replica_ctx=replica_ctx if synchronize else None,
            virtual_batch_size=virtual_batch_size, mask=mask,
            correction=correction)
    elif _choose_fused(fused, x, axis, epsilon, True):
        y, mean, variance = fused_kernels.fused_train(x, gamma, beta, epsilon, axis)
        stats = BatchStats(_channel_count(x, mean), mean, variance)
    else:
        y, stats = _general_train(x, gamma, beta, epsilon, axis)
    stats = BatchStats(*(tf.stop_gradient(t) for t in stats))
    if replica_ctx is not None and not synchronize:
        stats = BatchStats(*_replica_moments(
            replica_ctx, stats.count, stats.mean, stats.variance, pooled_moments))
    return y, stats


def _channel_count(x, like):
    n = tf.size(x, tf.int64) // tf.size(like, tf.int64)
    return tf.fill(tf.shape(like), tf.cast(n, like.dtype))


def batch_norm(
    x,
    gamma,
    beta,
    moving_mean,
    moving_var,
    *,
    training,
    momentum=0.9,
    epsilon=1e-5,
    axis=-1,
    fused=None,
    synchronized=False,
    guard_bad_batches=True,
):
    """Batch normalization as a pure function.

    `y = gamma * (x - mean) / sqrt(var + epsilon) + beta`, with statistics
    per channel along `axis`, reduced over every other axis.

    Args:
        x: floating-point tensor of rank >= 2.
        gamma: (C,) scale, or None for no scale.
        beta: (C,) offset, or None for no offset.
        moving_mean: (C,) moving mean.
        moving_var: (C,) moving variance.
        training: Python bool or scalar bool tensor. True normalizes with the
            batch mean and biased batch variance and returns updated moving
            statistics; False normalizes with the moving statistics and
            returns them unchanged. A tensor selects between the two with
            `tf.cond` (both branches in one trace).
        momentum: weight of the old value in
            `new = momentum * moving + (1 - momentum) * batch`; in [0, 1].
        epsilon: added to the variance; > 0.
        axis: the channel axis; negative counts from the end.
        fused: None (default) picks the faster of TensorFlow's fused
            batch-norm kernel and plain TF ops for this call (see
            `keras_bn.fused.preferred`); True requires the kernel (ValueError
            if it can't serve: a float64 input, or training with an epsilon
            below the kernel's limit, which only cuDNN older than 7.5 has);
            False always uses TF ops. Both compute the same function.
        synchronized: In a multi-replica `tf.distribute` step, normalize
            with the statistics of the global batch (see `BatchNorm`).
        guard_bad_batches: If True (default), a training batch whose
            statistics are not finite or that has no values returns the
            moving statistics unchanged, as `BatchNorm`'s guard keeps its
            own; `y` is whatever the math gives.

    Returns:
        `(y, new_moving_mean, new_moving_var)`. `y` has the dtype of `x`; the
        statistics are float32 for float16/bfloat16 `x`, else `x`'s dtype.
    """
    momentum = check_momentum(momentum)
    epsilon = check_epsilon(epsilon)
    axis = check_axis(axis)
    fused = check_fused(fused)
    x = tf.convert_to_tensor(x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "batch_norm: argument `x` must be a float16, bfloat16, float32 or "
            f"float64 tensor; received dtype {x.dtype.name}."
        )
    axis = channel_axis(x.shape.rank, axis)
    channels = x.shape[axis]
    stat_dtype = statistics_dtype(x.dtype)
    gamma = _as_vector(gamma, "gamma", channels, stat_dtype)
    beta = _as_vector(beta, "beta", channels, stat_dtype)
    moving_mean = _as_vector(moving_mean, "moving_mean", channels, stat_dtype)
    moving_var = _as_vector(moving_var, "moving_var", channels, stat_dtype)
    if moving_mean is None or moving_var is None:
        raise ValueError(
            "batch_norm: arguments `moving_mean` and `moving_var` are "
            "required; received None."
        )
    training = check_training(training)

    def train():
        y, stats = normalize_batch(
            x, gamma, beta, epsilon=epsilon, axis=axis, fused=fused,
            synchronized=synchronized)
        mean, variance, accepted = moving_target(stats, guard=guard_bad_batches)
        return (
            y,
            kept_unless(accepted, moving_mean, update_moving(moving_mean, mean, momentum)),
            kept_unless(accepted, moving_var, update_moving(moving_var, variance, momentum)),
        )

    def infer():
        y = normalize_inference(
            x, moving_mean, moving_var, gamma, beta, epsilon=epsilon,
            axis=axis, fused=fused)
        return y, moving_mean, moving_var

    if isinstance(training, bool):
        return train() if training else infer()
    return tf.cond(training, train, infer)


def check_fused(fused, owner="batch_norm"):
    """Raises ValueError unless `fused` is None, True or False."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(
            f"{owner}: argument `fused` must be None, True or False; "
            f"received fused={fused!r}."
        )
    return fused


def _choose_fused(fused, x, axis, epsilon, training):
    if fused is False:
        return False
    reason = fused_kernels.unsupported_reason(x, axis, epsilon, training)
    if fused:
        if reason is not None:
            raise ValueError(f"batch_norm: fused=True, but {reason}.")
        return True
    return reason is None and fused_kernels.preferred(x, axis)


def check_training(training, owner="batch_norm"):
    """Returns a Python bool, or a scalar bool tensor left to `tf.cond`.

    An eager tensor is read at once; only a symbolic one needs both branches.
    """
    if training is None or isinstance(training, bool):
        return bool(training)
    if isinstance(training, numbers.Integral) and training in (0, 1):
        return bool(training)
    if tf.is_tensor(training) and training.dtype == tf.bool:
        if training.shape.rank not in (0, None):
            raise ValueError(
                f"{owner}: argument `training` must be a scalar; received a "
                f"tensor of shape {tuple(training.shape)}."
            )
        if not tf.executing_eagerly() or not hasattr(training, "numpy"):
            return training
        return bool(training.numpy())
    if hasattr(training, "dtype") and getattr(training, "shape", None) == ():
        if str(training.dtype) == "bool":
            return bool(training)
    raise TypeError(
        f"{owner}: argument `training` must be a bool or a scalar bool "
        f"tensor; received {training!r} of type {type(training).__name__}."
    )
