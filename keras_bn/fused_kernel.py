"""The fused kernel: TensorFlow's FusedBatchNormV3 (oneDNN/Eigen on CPU,
cuDNN on GPU), reached through free reshapes.

`tf.raw_ops.FusedBatchNormV3` reads a half-precision input directly, keeps
its statistics in float32 and has a registered gradient, so one kernel does
the work of the separate moments / normalize / cast ops. It only takes 4-D
tensors with the channel on axis 1 or 3; every single-axis case maps onto
that without copying memory (see `_kernel_view`).
"""

import tensorflow as tf

from keras_bn import ops
from keras_bn import private_api

KERNEL_DTYPES = (tf.float16, tf.bfloat16, tf.float32)

# cuDNN before 7.5 rejects epsilon below CUDNN_BN_MIN_EPSILON (1e-5, compared
# in double precision against the float32 attribute, so 1e-5 itself fails;
# TF's wrappers use 1.001e-5). Since 7.5 the minimum is 0, and the CPU kernel
# never had one.
LEGACY_CUDNN_MIN_EPSILON = 1.001e-5


def gpu_visible():
    """Whether the kernel runs on cuDNN (a GPU is visible to TensorFlow)."""
    return bool(tf.config.list_logical_devices("GPU"))


def min_epsilon():
    """The smallest epsilon the kernel accepts on the visible devices."""
    if not gpu_visible():
        return 0.0
    version = str(tf.sysconfig.get_build_info().get("cudnn_version", "0"))
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()] + [0, 0]
    return 0.0 if tuple(parts[:2]) >= (7, 5) else LEGACY_CUDNN_MIN_EPSILON


def unsupported_reason(x, axis, epsilon, training):
    """Why the fused kernel can't serve this call, or None if it can.

    `axis` is non-negative. A symbolic `training` counts as training: the
    training branch is the one with the epsilon limit.
    """
    if x.dtype not in KERNEL_DTYPES:
        return (
            "the kernel takes float16, bfloat16 or float32 inputs; received "
            f"dtype {x.dtype.name}"
        )
    if training is not False and epsilon < min_epsilon():
        return (
            f"this cuDNN needs epsilon >= {min_epsilon()} in training; "
            f"received epsilon={epsilon}"
        )
    return None


def _kernel_view(x, axis):
    """A free reshape of `x` to 4-D with its channel on axis 1 or 3.

    Channels-last: [A, 1, 1, C] in NHWC. Channel on axis k >= 1 of
    [d0..dk-1, C, dk+1..]: [prod(before), C, prod(after), 1] in NCHW. A 4-D
    input already in NHWC or NCHW is passed as it is, which keeps Grappler's
    Conv2D + FusedBatchNorm (+ ReLU) fusion available.
    """
    rank = x.shape.rank
    if rank == 4 and axis == 3:
        return x, "NHWC"
    if rank == 4 and axis == 1:
        return x, "NCHW"
    shape = tf.shape(x)
    channels = x.shape[axis] if x.shape[axis] is not None else shape[axis]
    if axis == rank - 1:
        return tf.reshape(x, [-1, 1, 1, channels]), "NHWC"
    before = tf.reduce_prod(shape[:axis])
    return tf.reshape(x, [before, channels, -1, 1]), "NCHW"


def _filled(gamma, beta, x, axis):
    """gamma and beta, ones and zeros where absent: the kernel needs both."""
    channels = tf.shape(x)[axis:axis + 1]
    gamma = tf.ones(channels, tf.float32) if gamma is None else gamma
    beta = tf.zeros(channels, tf.float32) if beta is None else beta
    return gamma, beta


# The CPU kernel sums in float32 without compensation: with the mean more
# than 100 standard deviations from zero (mean^2 > 1e4 var) its variance
# degrades (to 90x the truth at 1e4 + N(0, 1) over 256x32x32 values), while
# below that it stays at the 2e-5 relative error it has for centred data.
OFFSET_DOMINATED_RATIO = 1e4


def offset_dominated(mean, variance):
    """Per channel, whether the CPU kernel's statistics can't be trusted.

    cuDNN accumulates with Welford's method and needs no such check (which
    would also cost a device-to-host sync per layer and step).
    """
    return tf.square(mean) > OFFSET_DOMINATED_RATIO * variance


def train(x, gamma, beta, epsilon, axis):
    """Training-mode batch norm by the fused kernel.

    On a CPU, a batch whose mean dominates its spread (see
    `offset_dominated`) goes through the kernel a second time, shifted by
    the first pass's mean: batch norm doesn't change under a per-channel
    shift, and data near zero is where the kernel's float32 sums are
    accurate. The gradient is the kernel's own, taken from whichever pass
    served: a custom gradient, so that the first-order graph holds no
    gradient of the `tf.cond` (which doubled a model's first-step time).

    Args:
        x: float16/bfloat16/float32 input; `axis` non-negative.
        gamma, beta: float32 (C,) vectors or None.

    Returns:
        (y, BatchStats); y in x's dtype, per-channel float32 statistics.
    """
    view, data_format = _kernel_view(x, axis)
    gamma, beta = _filled(gamma, beta, x, axis)
    channel_axis = 1 if data_format == "NCHW" else 3

    def kernel(view):
        empty = tf.zeros([0], tf.float32)  # no running statistics in training
        return tf.raw_ops.FusedBatchNormV3(
            x=view, scale=gamma, offset=beta, mean=empty, variance=empty,
            epsilon=epsilon, exponential_avg_factor=1.0,
            data_format=data_format, is_training=True)

    n = ops.count_over(view, [i for i in range(4) if i != channel_axis], tf.float32)

    def biased(out):
        # The kernel reports the Bessel-corrected variance n/(n-1) * var
        # (for TF's own moving average); the semantics here are the biased one.
        return out.batch_variance * ((n - 1.0) / tf.maximum(n, 1.0))

    if gpu_visible():
        out = kernel(view)
        return (tf.reshape(out.y, tf.shape(x)),
                ops.BatchStats(tf.fill(tf.shape(out.batch_mean), n), out.batch_mean, biased(out)))

    @tf.custom_gradient
    def normalize(view, gamma, beta):
        first = kernel(view)

        def shifted():
            shape = [1, 1, 1, 1]
            shape[channel_axis] = -1
            # Only the channels that need it move: subtracting a mean from
            # values near it is exact (Sterbenz), from others it rounds in a
            # half-precision input. The shift in the input's dtype is what
            # is subtracted, and what is added back.
            shift = tf.stop_gradient(tf.where(dominated, first.batch_mean, 0.0))
            shift = tf.cast(shift, view.dtype)
            seen = view - tf.reshape(shift, shape)
            out = kernel(seen)
            return (out.y, seen, tf.cast(shift, tf.float32) + out.batch_mean, biased(out),
                    out.reserve_space_1, out.reserve_space_2, out.reserve_space_3)

        def plain():
            return (first.y, view, first.batch_mean, biased(first),
                    first.reserve_space_1, first.reserve_space_2, first.reserve_space_3)

        dominated = offset_dominated(first.batch_mean, biased(first))
        if private_api.in_xla_context():
            # XLA before TF 2.20 differentiates the tf.cond below into NaN
            # (twice, from the first pass's E[x^2] - E[x]^2 variance); the
            # shifted pass is exact for every channel (it shifts the others
            # by zero), so take it unconditionally there.
            y, seen, mean, variance, *reserve = shifted()
        else:
            y, seen, mean, variance, *reserve = tf.cond(
                tf.reduce_any(dominated), shifted, plain)

        def backward(dy, *_):
            # What TensorFlow's registered gradient of the kernel computes,
            # from the pass that produced y; its own gradient is registered
            # too, so second derivatives stay exact.
            grads = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=seen, scale=gamma, reserve_space_1=reserve[0],
                reserve_space_2=reserve[1], reserve_space_3=reserve[2],
                epsilon=epsilon, data_format=data_format, is_training=True)
            return grads[0], grads[1], grads[2]

        return (y, mean, variance), backward

    y, mean, variance = normalize(view, gamma, beta)
    return tf.reshape(y, tf.shape(x)), ops.BatchStats(tf.fill(tf.shape(mean), n), mean, variance)


def infer(x, gamma, beta, mean, variance, epsilon, axis):
    """Inference-mode batch norm by the fused kernel; y in x's dtype."""
    view, data_format = _kernel_view(x, axis)
    gamma, beta = _filled(gamma, beta, x, axis)
    if epsilon < min_epsilon():
        # Same result, epsilon within cuDNN's limit: the kernel adds its
        # epsilon to the variance we hand it, so hand it the difference.
        variance = variance + (epsilon - min_epsilon())
        epsilon = min_epsilon()
    out = tf.raw_ops.FusedBatchNormV3(
        x=view, scale=gamma, offset=beta, mean=mean, variance=variance,
        epsilon=epsilon, exponential_avg_factor=1.0,
        data_format=data_format, is_training=False,
    )
    # No Shape/Reshape pair around a 4-D input: converters fold the bare
    # kernel into a preceding convolution, and would not fold through them.
    return out.y if view is x else tf.reshape(out.y, tf.shape(x))
