"""`batch_norm`, the public op: the layer's math as a pure function.

It checks its arguments, runs `dispatch.train` or `dispatch.infer`, and
returns the moving statistics by the layer's own rule (`ops.moving_target`,
bad-batch guard included), so that the op and `BatchNorm` compute the same
function for the same arguments.
"""

from keras import ops as K

from keras_bn import backend
from keras_bn import checks
from keras_bn import dispatch
from keras_bn import ops


def batch_norm(
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
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
        moving_variance: (C,) moving variance.
        training: Python bool or scalar bool tensor. True normalizes with the
            batch mean and biased batch variance and returns updated moving
            statistics; False normalizes with the moving statistics and
            returns them unchanged. A tensor selects between the two with
            `tf.cond` (both branches in one trace).
        momentum: weight of the old value in
            `new = momentum * moving + (1 - momentum) * batch`; in [0, 1].
        epsilon: added to the variance; > 0.
        axis: the channel axis; negative counts from the end. Or a list of
            axes, as `BatchNorm` takes it: statistics per position of those
            axes, and gamma, beta and the moving statistics of the shape of
            `x`'s sizes on them, in increasing order of axis.
        fused: None (default) picks the faster of TensorFlow's fused
            batch-norm kernel and plain TF ops for this call (see
            `keras_bn.dispatch.route`); True requires the kernel (ValueError
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
        `(y, new_moving_mean, new_moving_variance)`. `y` has the dtype of `x`; the
        statistics are float32 for float16/bfloat16 `x`, else `x`'s dtype.
    """
    caller = "batch_norm"
    momentum = checks.momentum(momentum, caller)
    epsilon = checks.epsilon(epsilon, caller)
    given = axis = checks.axis(axis, caller)
    fused = checks.fused(fused, caller)
    x = checks.float_input(x, caller)
    axis = checks.channel_axis(len(x.shape), axis, caller)
    channels = x.shape[axis] if isinstance(axis, int) else tuple(x.shape[a] for a in axis)
    stat_dtype = ops.statistics_dtype(x.dtype)
    gamma, beta, moving_mean, moving_variance = (
        checks.vector(value, name, channels, stat_dtype, caller, given)
        for value, name in ((gamma, "gamma"), (beta, "beta"),
                            (moving_mean, "moving_mean"),
                            (moving_variance, "moving_variance")))
    if moving_mean is None or moving_variance is None:
        raise ValueError(
            f"{caller}: arguments `moving_mean` and `moving_variance` are "
            "required; received None.")
    training = checks.training(training, caller)
    if not isinstance(axis, int):
        # The kernels take (C,) vectors, row-major over the axes.
        shape = K.shape(moving_mean)
        gamma, beta = (None if v is None else K.reshape(v, [-1]) for v in (gamma, beta))

    def train():
        y, stats = dispatch.train(
            x, gamma=gamma, beta=beta, epsilon=epsilon, axis=axis, fused=fused,
            synchronized=synchronized)
        if not isinstance(axis, int):
            stats = ops.BatchStats(*(K.reshape(t, shape) for t in stats))
        mean, variance, accepted = ops.moving_target(stats, guard=guard_bad_batches)
        return (
            y,
            ops.kept_unless(accepted, moving_mean,
                            ops.update_moving(moving_mean, mean, momentum)),
            ops.kept_unless(accepted, moving_variance,
                            ops.update_moving(moving_variance, variance, momentum)),
        )

    def infer():
        mean, variance = moving_mean, moving_variance
        if not isinstance(axis, int):
            mean, variance = K.reshape(mean, [-1]), K.reshape(variance, [-1])
        y = dispatch.infer(x, mean=mean, variance=variance, gamma=gamma, beta=beta,
                           epsilon=epsilon, axis=axis, fused=fused)
        return y, moving_mean, moving_variance

    if isinstance(training, bool):
        return train() if training else infer()
    return backend.cond(training, train, infer)
