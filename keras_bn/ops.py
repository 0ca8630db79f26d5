"""Pure batch-normalization math: statistics, normalization, moving averages.

Nothing here owns a variable. `batch_norm` is the public op; the layer in
`keras_bn.layer` calls it and only assigns the moving statistics it returns.
Every formula lives in this module once.
"""

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


def statistics_dtype(dtype):
    """float32 for half-precision inputs (their sums overflow), else `dtype`."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in _HALF_DTYPES else dtype


def _per_channel(v, rank, axis):
    """Reshapes a (C,) vector so that it broadcasts along `axis`."""
    if axis == rank - 1:
        return v
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(v, shape)


def _mean(x, axes):
    """Mean over `axes` in two stages: the trailing axes, then the first.

    Summing hundreds of thousands of float32 values in one pass lets the
    rounding error of the running sum grow with it (0.6 % of the variance
    for 256x32x32 values at an offset of 1e4); summing each image first
    keeps every partial sum short.
    """
    if len(axes) > 1:
        x = tf.reduce_mean(x, axes[1:], keepdims=True)
    return tf.reduce_mean(x, axes[:1], keepdims=True)


def _two_pass(x, axes):
    mean = _mean(x, axes)
    centered = x - tf.stop_gradient(mean)
    residual = _mean(centered, axes)
    variance = _mean(tf.square(centered), axes)
    variance = tf.maximum(variance - tf.square(residual), 0.0)
    # The residual corrects the mean's value, not its gradient (which
    # `mean` already carries in full).
    return mean + tf.stop_gradient(residual), variance


# The one-pass variance E[d^2] - E[d]^2 loses about log2(1 + E[d]^2 / var)
# bits to cancellation; past 6 bits (E[d]^2 > 63 var) two passes are used.
_MAX_SHIFT_RATIO = 63.0


def _shifted_one_pass(x, axes, axis):
    """Mean and variance from the sums of d and d^2 in one pass over x.

    d = x - s with s each channel's first element: data values, so s sits
    within a few standard deviations of the mean and removes any common
    offset (1e4 + N(0, 1)). Should s be an outlier, the two-pass estimate is
    computed instead, so accuracy never drops below it.
    """
    rank = x.shape.rank
    first = x[tuple(slice(0, 1) if i != axis else slice(None) for i in range(rank))]
    shift = tf.stop_gradient(first)
    d = x - shift
    d_mean = _mean(d, axes)
    d_square = _mean(tf.square(d), axes)
    variance = tf.maximum(d_square - tf.square(d_mean), 0.0)
    lossy = tf.reduce_any(tf.square(d_mean) > _MAX_SHIFT_RATIO * variance)
    return tf.cond(
        lossy,
        lambda: _two_pass(x, axes),
        lambda: (shift + d_mean, variance),
    )


def moments(x, axis=-1, one_pass=False):
    """Per-channel mean and biased variance of `x` over every axis but `axis`.

    Half-precision inputs are reduced in float32. By default the variance
    is the corrected two-pass estimate, mean((x - m)^2) - mean(x - m)^2: the
    second term removes the rounding error of `m` itself, which matters
    when the data sit on a large common offset (1e4 + N(0, 1) in float32).
    `one_pass=True` computes both from one read of `x` (sums about a
    shift, see `_shifted_one_pass`), which XLA fuses into a single loop,
    with the same accuracy. The variance is clamped at 0 because rounding
    may still leave a tiny negative.

    Returns:
        (mean, variance), each of shape (C,).
    """
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    axis = channel_axis(rank, check_axis(axis, "moments"), "moments")
    x = tf.cast(x, statistics_dtype(x.dtype))
    axes = [i for i in range(rank) if i != axis]
    if one_pass:
        mean, variance = _shifted_one_pass(x, axes, axis)
    else:
        mean, variance = _two_pass(x, axes)
    return tf.reshape(mean, [-1]), tf.reshape(variance, [-1])


def scale_and_offset(mean, variance, gamma, beta, epsilon):
    """Per-channel a, b such that batch norm is `x * a + b`.

    a = gamma / sqrt(variance + epsilon), b = beta - mean * a. This is the
    inference form that converters fold into the preceding layer.
    """
    epsilon = tf.cast(epsilon, variance.dtype)
    a = tf.math.rsqrt(variance + epsilon)
    if gamma is not None:
        a = a * gamma
    b = -mean * a
    if beta is not None:
        b = beta + b
    return a, b


def update_moving(moving, batch_value, momentum):
    """The exponential moving average: momentum * moving + (1 - momentum) * batch."""
    return momentum * moving + (1.0 - momentum) * batch_value


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


def _local_count(x, channels_like):
    return tf.cast(tf.size(x, tf.int64) // tf.size(channels_like, tf.int64),
                   channels_like.dtype)


def _replica_moments(ctx, x, mean, variance, merge):
    """Gathers every replica's (count, mean, variance) and merges them."""
    count = _local_count(x, mean)
    # An empty replica batch has NaN statistics; its count of 0 drops it.
    mean = tf.where(count > 0, mean, 0.0)
    variance = tf.where(count > 0, variance, 0.0)
    rows = distributed.gather_rows(
        ctx, tf.stack([tf.fill(tf.shape(mean), count), mean, variance]))
    return merge(rows[:, 0], rows[:, 1], rows[:, 2])


def _as_vector(value, name, channels, dtype):
    if value is None:
        return None
    value = tf.convert_to_tensor(value)
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


def _staged_sum(x, axes):
    if len(axes) > 1:
        x = tf.reduce_sum(x, axes[1:], keepdims=True)
    return tf.reduce_sum(x, axes[:1], keepdims=True)


def _general_train(x, gamma, beta, epsilon, axis, replica_ctx=None):
    """Training-mode batch norm from TF ops, with a lean custom gradient.

    The backward pass keeps only x, the mean and the inverse std (not the
    normalized tensor) and needs two per-channel sums, sum(dy) and
    sum(dy * (x - mean)), reduced side by side so that XLA fuses them into
    one pass over dy and x.

    With a `replica_ctx` the statistics are those of the global batch (one
    all-reduce forward, one backward, each of a few (C,) vectors).

    Returns:
        (y, batch_mean, biased_batch_variance); y in x's dtype, statistics in
        `statistics_dtype(x.dtype)` and carrying no gradient.
    """
    rank = x.shape.rank
    axes = [i for i in range(rank) if i != axis]
    stat_dtype = statistics_dtype(x.dtype)
    has_gamma, has_beta = gamma is not None, beta is not None
    params = [p for p in (gamma, beta) if p is not None]

    one_pass = fused_kernels.in_xla_context()

    @tf.custom_gradient
    def forward(x, *params):
        mean, variance = moments(x, axis, one_pass=one_pass)
        count = _local_count(x, mean)
        if replica_ctx is not None:
            count, mean, variance = _replica_moments(
                replica_ctx, x, mean, variance, merge_moments)
        mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
        inv = tf.math.rsqrt(variance + tf.cast(epsilon, stat_dtype))
        g = params[0] if has_gamma else None
        b = params[-1] if has_beta else None
        scale = inv if g is None else inv * g
        xs = tf.cast(x, stat_dtype)
        # With batch statistics the input is centred first: x * a + b would
        # cancel two large terms when |mean| >> std and lose digits.
        y = (xs - _per_channel(mean, rank, axis)) * _per_channel(scale, rank, axis)
        if b is not None:
            y = y + _per_channel(b, rank, axis)

        def backward(dy, _dmean, _dvar):
            dy = tf.cast(dy, stat_dtype)
            centered = tf.cast(x, stat_dtype) - _per_channel(mean, rank, axis)
            sum_dy = _staged_sum(dy, axes)
            sum_dy_centered = _staged_sum(dy * centered, axes)
            # gamma and beta get this replica's share (the optimizer sums
            # replicas); x sees every replica's outputs through the stats.
            grad_gamma = tf.reshape(sum_dy_centered, [-1]) * inv
            grad_beta = tf.reshape(sum_dy, [-1])
            if replica_ctx is not None:
                sums = distributed.all_sum(
                    replica_ctx, tf.stack([sum_dy, sum_dy_centered]))
                sum_dy, sum_dy_centered = sums[0], sums[1]
            inv_b = _per_channel(inv, rank, axis)
            scale_b = _per_channel(scale, rank, axis)
            # d/dx of gamma * (x - mean) * inv with mean and inv functions
            # of the whole batch: the classic three-term formula.
            n = _per_channel(tf.maximum(count, 1.0), rank, axis)
            dx = scale_b * (
                dy
                - sum_dy / n
                - centered * (inv_b * inv_b) * (sum_dy_centered / n)
            )
            grads = []
            if has_gamma:
                grads.append(grad_gamma)
            if has_beta:
                grads.append(grad_beta)
            return (tf.cast(dx, x.dtype), *grads)

        return (tf.cast(y, x.dtype), mean, variance), backward

    return forward(x, *params)


def _infer(x, mean, variance, gamma, beta, epsilon, axis):
    """Inference-mode batch norm as `x * a + b`, the form converters fold."""
    rank = x.shape.rank
    a, b = scale_and_offset(mean, variance, gamma, beta, epsilon)
    xs = tf.cast(x, statistics_dtype(x.dtype))
    y = xs * _per_channel(a, rank, axis) + _per_channel(b, rank, axis)
    return tf.cast(y, x.dtype)


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

    Returns:
        `(y, new_moving_mean, new_moving_var)`. `y` has the dtype of `x`; the
        statistics are float32 for float16/bfloat16 `x`, else `x`'s dtype.
    """
    momentum = check_momentum(momentum)
    epsilon = check_epsilon(epsilon)
    axis = check_axis(axis)
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
    replica_ctx = distributed.replica_context()
    synchronize = bool(synchronized) and replica_ctx is not None
    use_fused = _choose_fused(fused, x, axis, epsilon, training)
    if use_fused and synchronize and training is not False:
        if fused:
            raise ValueError(
                "batch_norm: fused=True, but synchronized statistics in a "
                "multi-replica step need TF ops (the kernel sees one "
                "replica's batch)."
            )
        use_fused = False

    def train():
        if synchronize:
            y, mean, variance = _general_train(
                x, gamma, beta, epsilon, axis, replica_ctx)
        elif use_fused:
            y, mean, variance = fused_kernels.fused_train(
                x, gamma, beta, epsilon, axis, moving_mean)
            fused_result = (y, mean, variance)
            y, mean, variance = tf.cond(
                fused_kernels.offset_dominated(mean, variance),
                lambda: _general_train(x, gamma, beta, epsilon, axis),
                lambda: fused_result,
            )
        else:
            y, mean, variance = _general_train(x, gamma, beta, epsilon, axis)
        mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
        if replica_ctx is not None and not synchronize:
            _, mean, variance = _replica_moments(
                replica_ctx, x, mean, variance, pooled_moments)
        return (
            y,
            update_moving(moving_mean, mean, momentum),
            update_moving(moving_var, variance, momentum),
        )

    def infer():
        if use_fused:
            y = fused_kernels.fused_infer(
                x, gamma, beta, moving_mean, moving_var, epsilon, axis)
        else:
            y = _infer(x, moving_mean, moving_var, gamma, beta, epsilon, axis)
        return y, moving_mean, moving_var

    if isinstance(training, bool):
        return train() if training else infer()
    return tf.cond(training, train, infer)


def _choose_fused(fused, x, axis, epsilon, training):
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(
            "batch_norm: argument `fused` must be None, True or False; "
            f"received fused={fused!r}."
        )
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
