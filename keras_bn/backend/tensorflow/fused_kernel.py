"""The fused kernel: TensorFlow's FusedBatchNormV3 (oneDNN/Eigen on CPU,
cuDNN on GPU), reached through free reshapes.

`tf.raw_ops.FusedBatchNormV3` reads a half-precision input directly, keeps
its statistics in float32 and has a registered gradient, so one kernel does
the work of the separate moments / normalize / cast ops. It only takes 4-D
tensors with the channel on axis 1 or 3; every single-axis case maps onto
that without copying memory (see `_kernel_view`), and so does a block of
neighbouring axes; other sets of axes take the TF-ops kernel.
"""

import tensorflow as tf

from keras_bn.backend.tensorflow import conv_fold
from keras_bn.backend.tensorflow import one_side
from keras_bn import ops
from keras_bn.backend.tensorflow import private_api

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

    `axis` is non-negative, or a sorted tuple of axes. A symbolic
    `training` counts as training: the training branch is the one with the
    epsilon limit.
    """
    axes = ops.axes_of(axis)
    if axes[-1] - axes[0] != len(axes) - 1:
        return (
            "the kernel takes one channel axis, or axes next to each other that "
            f"a reshape makes one; received axes {list(axes)}"
        )
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
    Conv2D + FusedBatchNorm (+ ReLU) fusion available. A block of
    neighbouring axes (a sorted tuple) is one channel axis of the product
    of their sizes, row-major as the (C,) vectors run.
    """
    rank = x.shape.rank
    if rank == 4 and axis == 3:
        return x, "NHWC"
    if rank == 4 and axis == 1:
        return x, "NCHW"
    shape = tf.shape(x)
    axes = ops.axes_of(axis)
    first, last = axes[0], axes[-1]
    block = x.shape[first:last + 1]
    channels = (block.num_elements() if block.is_fully_defined()
                else tf.reduce_prod(shape[first:last + 1]))
    if last == rank - 1:
        return tf.reshape(x, [-1, 1, 1, channels]), "NHWC"
    before = tf.reduce_prod(shape[:first])
    return tf.reshape(x, [before, channels, -1, 1]), "NCHW"


def _filled(view, data_format, *, gamma, beta):
    """gamma and beta, ones and zeros where absent: the kernel needs both."""
    if gamma is not None and beta is not None:
        return gamma, beta
    channel_axis = _channel_axis(data_format)
    channels = tf.shape(view)[channel_axis:channel_axis + 1]
    gamma = tf.ones(channels, tf.float32) if gamma is None else gamma
    beta = tf.zeros(channels, tf.float32) if beta is None else beta
    return gamma, beta


# The CPU kernel sums in float32 without compensation: with the mean more
# than 100 standard deviations from zero (mean^2 > 1e4 var) its variance
# degrades (to 90x the truth at 1e4 + N(0, 1) over 256x32x32 values), while
# below that it stays at the 2e-5 relative error it has for centred data.
# Batch norm doesn't change under a per-channel shift, so a channel whose
# values lie far from zero is shifted towards them before the kernel sees
# it. Where they lie comes from a sample of at least ops.SHIFT_SAMPLE values
# per channel: the batch's first rows (a slice, no pass over the batch).
SHIFT_SAMPLE = ops.SHIFT_SAMPLE

def _channel_axis(data_format):
    """The channel axis of a kernel view in `data_format`."""
    return 1 if data_format == "NCHW" else 3


def _kernel(view, *, gamma, beta, epsilon, data_format):
    empty = tf.zeros([0], tf.float32)  # no running statistics in training
    return tf.raw_ops.FusedBatchNormV3(
        x=view, scale=gamma, offset=beta, mean=empty, variance=empty,
        epsilon=epsilon, exponential_avg_factor=1.0,
        data_format=data_format, is_training=True)


def _sample_shift(view, *, gamma, beta, epsilon, data_format):
    """Per channel, float32: the shift the kernel's input gets (0 for most).

    The mean of the batch's first rows (at least SHIFT_SAMPLE values per
    channel) where it is offset-dominated (`ops.offset_dominated`) against their
    spread. The kernel itself measures the sample: one op, which matters
    for a model's start-up time (every op is traced and optimized in each
    batch norm). An empty batch's NaN mean compares False: no shift.
    """
    channel_axis = _channel_axis(data_format)
    per_row = [d for i, d in enumerate(view.shape[1:], 1) if i != channel_axis]
    if None in per_row:
        shape = tf.shape(view)
        per_row = tf.reduce_prod(shape[1:]) // tf.maximum(shape[channel_axis], 1)
        rows = (SHIFT_SAMPLE + per_row - 1) // tf.maximum(per_row, 1)
    else:
        per_row = max(1, per_row[0] * per_row[1])
        rows = -(-SHIFT_SAMPLE // per_row)
    sample = _kernel(view[:rows], gamma=gamma, beta=beta, epsilon=epsilon,
                     data_format=data_format)
    mean = sample.batch_mean
    # Ten of the sample's standard deviations: a hundred times below the
    # ratio where the kernel starts to lose accuracy, so that a sample that
    # understates the offset still moves every channel that needs it. The
    # others keep their values bit for bit.
    shift = tf.where(ops.offset_dominated(mean, sample.batch_variance), mean, 0.0)
    return tf.stop_gradient(shift)  # a constant, so no gradient reaches the sample


def _shifted(view, shift, channel_axis):
    return view - (shift if channel_axis == 3 else tf.reshape(shift, [1, -1, 1, 1]))


def _shifted_if_needed(view, shift, channel_axis):
    """`view` minus `shift`, or `view` itself (no copy) when all shifts are 0.

    Nearly every batch needs no shift, and subtracting zeros would cost a
    pass over the batch (up to a fifth of DenseNet121's train step): the
    subtraction runs on one side only (`one_side`). XLA fuses it into the
    kernel's reads: there it is taken as is.
    """
    if private_api.in_xla_context():
        return _shifted(view, shift, channel_axis)
    needed = tf.reduce_any(tf.not_equal(shift, 0))
    return one_side.one_side(
        needed, lambda v, s: (_shifted(v, s, channel_axis),), lambda v, s: (v,),
        view, shift)[0]


def _kernel_gradient(dy, view, seen, saved, *, gamma, shift, epsilon, data_format):
    """The kernel's gradient (dx, dgamma, dbeta) from the data it saw.

    `saved` holds the three reserve spaces FusedBatchNormGradV3 reads: the
    forward kernel's own, or on a CPU the statistics normalized with.

    A custom gradient itself: `seen` may come out of a Merge, so the second
    derivatives (TensorFlow's registered gradient of FusedBatchNormGradV3)
    are taken at the shifted data recomputed from `view` by a plain
    subtraction, which only a second-order graph contains.
    """
    channel_axis = _channel_axis(data_format)

    def kernel_gradient(dy, seen, gamma):
        return tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dy, x=seen, scale=gamma, reserve_space_1=saved[0],
            reserve_space_2=saved[1], reserve_space_3=saved[2],
            epsilon=epsilon, data_format=data_format, is_training=True)[:3]

    @tf.custom_gradient
    def first_order(dy, view, gamma):
        def second_order(*upstream):
            inputs = [dy, _shifted(view, shift, channel_axis), gamma]
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                grads = kernel_gradient(*inputs)
            # d seen / d view is the identity.
            return tape.gradient(grads, inputs, output_gradients=list(upstream))

        return kernel_gradient(dy, seen, gamma), second_order

    return first_order(dy, view, gamma)


# The most values per channel the CPU kernel sums at once. Its float32
# running sums lose accuracy in proportion to their length, most on data with
# few distinct values: its variance of 0/1 data is off by up to 3e-5 relative
# at 2048 values per channel, 5e-5 at 4096, 1e-4 to 2e-4 at 16384 and 8e-3
# at 2^20, and of data at an offset of 1e6 with std 0.1 (shifted by the
# guard) by 2e-5 at 4096 and up to 4e-3 at 2^20 (oneDNN and Eigen alike;
# benchmarks/README.md, "Kernel accuracy"). Larger batches have their
# statistics measured in groups of at most this many values.
SUM_LIMIT = 2048


def _grouped_statistics(seen, *, epsilon, data_format):
    """(mean, biased variance) per channel of a kernel view, float32, with
    no float32 sum longer than SUM_LIMIT values.

    Channels-last, the rows [A, C] are read as [A/k, k*C] (a free reshape):
    k channels per channel, each summing every k-th row, which the kernel
    measures in one call; the k parts are then merged exactly
    (`ops.merge_moments`), with the last A mod k rows as a part of their
    own. The kernel's output of that call is not used. Channels-first
    views have no such free reshape: TF ops' staged reductions.
    """
    if data_format == "NCHW":
        mean, variance = ops.staged_moments(tf.cast(seen, tf.float32), [0, 2, 3])
        return tf.reshape(mean, [-1]), tf.reshape(variance, [-1])
    channels = seen.shape[3] if seen.shape[3] is not None else tf.shape(seen)[3]
    rows = tf.reshape(seen, [-1, channels])
    total = rows.shape[0]
    if total is None:
        total = tf.shape(rows)[0]
        groups = tf.maximum((total + SUM_LIMIT - 1) // SUM_LIMIT, 1)
    else:
        groups = max(-(-total // SUM_LIMIT), 1)
    length = total // groups
    body = groups * length

    def measured(part, parts):
        """Per part and channel, [parts, C]: the mean and biased variance
        (on a CPU the kernel's reserve spaces hold them)."""
        width = tf.shape(part)[3:]
        out = _kernel(part, gamma=tf.ones(width, tf.float32), beta=tf.zeros(width, tf.float32),
                      epsilon=epsilon, data_format="NHWC")
        return (tf.reshape(out.reserve_space_1, [parts, channels]),
                tf.reshape(out.reserve_space_2, [parts, channels]))

    if isinstance(body, int) and body == total:
        # Every part the same size (a static shape that the groups divide,
        # nearly every convolution's): plain means over the parts.
        means, variances = measured(tf.reshape(rows, [length, 1, 1, groups * channels]), groups)
        mean = tf.reduce_mean(means, 0)
        return mean, tf.reduce_mean(variances + tf.square(means - mean), 0)
    parts = [measured(tf.reshape(rows[:body], [length, 1, 1, groups * channels]), groups),
             measured(tf.reshape(rows[body:], [-1, 1, 1, channels]), 1)]
    lengths = [tf.cast(length, tf.float32), tf.cast(total - body, tf.float32)]
    # A part with no rows reports NaN: it counts 0, with finite stand-ins.
    counts = tf.concat([tf.fill([n, channels], c) for n, c in zip((groups, 1), lengths)], 0)
    means, variances = (tf.where(counts > 0, tf.concat(list(t), 0), 0.0) for t in zip(*parts))
    _, mean, variance = ops.merge_moments(counts, means, variances)
    return mean, variance


def _biased(variance, n, known):
    """The kernel's Bessel-corrected n/(n-1) * var (for TF's own moving
    average) as the biased variance, the semantics here; `known` is the
    count `n` where static, else None."""
    if known is None:
        return variance * ((n - 1.0) / tf.maximum(n, 1.0))
    return variance * float((known - 1.0) / max(known, 1.0))


def train(x, *, gamma, beta, epsilon, axis):
    """Training-mode batch norm by the fused kernel.

    On a CPU the kernel sees the batch shifted per channel towards its
    values (see `_sample_shift`) where they lie far from zero, so that its
    float32 sums stay accurate; the shift is added back to the mean it
    reports. A batch of more than SUM_LIMIT values per channel (or of a
    size unknown when traced) has its statistics measured in groups
    (`_grouped_statistics`); the kernel then normalizes with them (its
    inference form: one pass). The gradient is the kernel's own
    (FusedBatchNormGradV3), computed from the data the kernel saw and the
    statistics used, to every order.

    Args:
        x: float16/bfloat16/float32 input; `axis` non-negative, or a
            sorted tuple of neighbouring axes.
        gamma, beta: float32 (C,) vectors or None.

    Returns:
        (y, BatchStats); y in x's dtype, per-channel float32 statistics.
    """
    view, data_format = _kernel_view(x, axis)
    gamma, beta = _filled(view, data_format, gamma=gamma, beta=beta)
    channel_axis = _channel_axis(data_format)
    # Values per channel; `known` where the shape tells it when traced.
    n = ops.count_over(view, [i for i in range(4) if i != channel_axis], tf.float32)
    known = tf.get_static_value(n)
    if gpu_visible():
        out = _kernel(view, gamma=gamma, beta=beta, epsilon=epsilon, data_format=data_format)
        y, mean, variance = out.y, out.batch_mean, _biased(out.batch_variance, n, known)
    else:
        # The shift in the input's dtype is what is subtracted, and what is
        # added back. Subtracting it from values near it is exact in any
        # precision (Sterbenz); unshifted channels subtract zero.
        shift = tf.cast(_sample_shift(view, gamma=gamma, beta=beta, epsilon=epsilon,
                                      data_format=data_format), view.dtype)
        grouped = known is None or known > SUM_LIMIT

        @tf.custom_gradient
        def normalize(view, gamma, beta):
            seen = _shifted_if_needed(view, shift, channel_axis)
            if grouped:
                mean, variance = _grouped_statistics(seen, epsilon=epsilon,
                                                     data_format=data_format)
                y = _infer_kernel(seen, mean=mean, variance=variance, gamma=gamma, beta=beta,
                                  epsilon=epsilon, data_format=data_format)
                # What FusedBatchNormGradV3 reads on a CPU: the mean and
                # the biased variance it normalized with.
                saved = (mean, variance, tf.zeros([0], tf.float32))
            else:
                out = _kernel(seen, gamma=gamma, beta=beta, epsilon=epsilon,
                              data_format=data_format)
                y, mean = out.y, out.batch_mean
                variance = _biased(out.batch_variance, n, known)
                saved = (out.reserve_space_1, out.reserve_space_2, out.reserve_space_3)

            def backward(dy, *_):
                return _kernel_gradient(dy, view, seen, saved, gamma=gamma, shift=shift,
                                        epsilon=epsilon, data_format=data_format)

            return (y, mean + tf.cast(shift, tf.float32), variance), backward

        y, mean, variance = normalize(view, gamma, beta)
    channels = view.shape[channel_axis]
    if known is None or channels is None:
        count = tf.fill(tf.shape(mean), n)
    else:
        count = tf.constant(known, tf.float32, shape=[channels])
    return (y if view is x else tf.reshape(y, tf.shape(x))), ops.BatchStats(count, mean, variance)


def infer(x, *, mean, variance, gamma, beta, epsilon, axis):
    """Inference-mode batch norm by the fused kernel; y in x's dtype."""
    view, data_format = _kernel_view(x, axis)
    gamma, beta = _filled(view, data_format, gamma=gamma, beta=beta)
    if epsilon < min_epsilon():
        # Same result, epsilon within cuDNN's limit: the kernel adds its
        # epsilon to the variance we hand it, so hand it the difference.
        variance = variance + (epsilon - min_epsilon())
        epsilon = min_epsilon()
    if view is not x:
        return tf.reshape(_infer_kernel(view, mean=mean, variance=variance, gamma=gamma,
                                        beta=beta, epsilon=epsilon, data_format=data_format),
                          tf.shape(x))
    # No Shape/Reshape pair around a 4-D input: converters fold the bare
    # kernel into a preceding convolution, and would not fold through them.
    x, beta, mean = conv_fold.bias_absorbed(x, mean=mean, variance=variance, gamma=gamma,
                                            beta=beta, epsilon=epsilon, data_format=data_format)
    return _infer_kernel(x, mean=mean, variance=variance, gamma=gamma, beta=beta,
                         epsilon=epsilon, data_format=data_format)


def _infer_kernel(view, *, mean, variance, gamma, beta, epsilon, data_format):
    return tf.raw_ops.FusedBatchNormV3(
        x=view, scale=gamma, offset=beta, mean=mean, variance=variance,
        epsilon=epsilon, exponential_avg_factor=1.0,
        data_format=data_format, is_training=False,
    ).y

