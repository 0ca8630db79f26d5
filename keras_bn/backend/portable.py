"""The keras.ops kernel: batch norm for the backends without TensorFlow's
kernels (JAX, PyTorch).

One route: the statistics and the normalization from `keras_bn.ops`, and
the gradient from the backend's own autodiff of them. Nothing here writes
a custom gradient, so every order is exact, forward mode included
(`jax.jvp`, `jax.hessian`), and XLA (JAX) fuses the passes as it does
Keras's own layer.
"""

import collections

import keras

from keras import ops as K

from keras_bn import ops

KERAS_OPS = "keras_ops"

Route = collections.namedtuple("Route", ["kernel", "reason"])


def route(x, axis, epsilon, *, training, fused=None, features=None, caller="batch_norm"):
    """The kernel a call takes, and why: always this one here (fused=True
    was refused where it entered, `checks.fused`)."""
    return Route(KERAS_OPS, f"the {keras.config.backend()} backend: keras.ops, "
                            "differentiated by the backend's autodiff")


def _moments(xs, axes, weights):
    """keepdims (count, shift, mean relative to the shift, variance) of xs
    over `axes`, exact at any offset: the shift is a sample mean
    (`ops.sample_shift`; with weights, a first weighted mean) carrying no
    gradient, and the sums run over xs - shift (`ops.shifted_moments`)."""
    if weights is not None:
        return ops.weighted_moments(xs, axes, weights)
    shift = ops.sample_shift(xs, axes)
    mean, variance = ops.shifted_moments(xs, axes, shift)
    count = K.ones_like(mean) * ops.count_over(xs, axes, mean.dtype)
    return count, shift, mean, variance


def data_parallel_replicas():
    """How many devices share the batch axis under the Keras distribution in
    effect (`keras.distribution.DataParallel`, or ModelParallel's batch
    dimension): 1 without one."""
    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    name = getattr(distribution, "batch_dim_name", None)
    if mesh is None or name not in mesh.axis_names:
        return 1
    return int(dict(zip(mesh.axis_names, mesh.shape))[name])


def _merged(count, shift, relative, variance, all_sum):
    """The keepdims statistics of the union of every process's batch, from
    each one's (count, shift, relative mean, variance), by two all-sums of a
    few (C,) rows: first a common shift (the count-weighted mean of the
    shifts), then the counts, and the sums of the values and of their
    squares relative to it. Every term is small where the shifts lie near
    the data, so nothing cancels; a process with no values adds zeros."""
    has = count > 0
    zero = K.zeros_like(relative)
    first = all_sum(K.stack([count * K.where(has, shift, zero), count]))
    total = first[1]
    common = K.stop_gradient(K.divide_no_nan(first[0], total))
    relative = (shift - common) + relative
    sums = all_sum(K.stack([
        count * K.where(has, relative, zero),
        count * K.where(has, variance + K.square(relative), zero)]))
    mean = K.divide_no_nan(sums[0], total)
    variance = K.relu(K.divide_no_nan(sums[1], total) - K.square(mean))
    return total, common, mean, variance


def train(x, *, gamma, beta, epsilon, axis, fused=None, synchronized=False,
          virtual_batch_size=None, mask=None, correction=None, adjustment=None,
          caller="batch_norm", all_sum=None):
    """Training-mode normalization with batch statistics; no moving update.

    Arguments as in the TensorFlow backend's `dispatch.train`. Under a Keras
    distribution (JAX's) the batch is one global array across devices, each
    holding a consecutive share: `synchronized=True` takes the global
    batch's statistics, and False each share's own, as TensorFlow's
    replicas do, by the ghost-batch grouping with one group per share (the
    moving statistics then follow their average, the same everywhere). A
    user's ghost batches, which divide each share, need nothing more.

    `all_sum`: where given (PyTorch's process group), `synchronized=True`
    merges every process's statistics with it (`_merged`); the output and
    the gradient then see the global batch.

    Returns:
        (y, BatchStats), the statistics carrying no gradient.
    """
    route(x, axis, epsilon, training=True, fused=fused, caller=caller)
    replicas = data_parallel_replicas()
    batch = x.shape[0]
    if (not synchronized and virtual_batch_size is None and replicas > 1
            and batch is not None and batch % replicas == 0 and 0 not in ops.axes_of(axis)):
        virtual_batch_size = batch // replicas
    stat_dtype = ops.statistics_dtype(x.dtype)
    if adjustment is not None:
        gamma, beta = ops.adjusted_gamma_and_beta(
            gamma=gamma, beta=beta, adjust_scale=adjustment[0], adjust_bias=adjustment[1])
    rank = len(x.shape)
    channel_axes, sizes = ops.axes_of(axis), ops.sizes_on(x, axis)
    xs = K.cast(x, stat_dtype)
    weights = None
    if mask is not None:
        weights = K.broadcast_to(K.cast(mask, stat_dtype), K.shape(x))
    if virtual_batch_size is not None:
        # [N, ...] -> [G, v, ...]: sub-batch g holds examples g*v .. g*v+v-1.
        ghost = [-1, virtual_batch_size, *K.shape(x)[1:]]
        xs = K.reshape(xs, ghost)
        weights = None if weights is None else K.reshape(weights, ghost)
        channel_axes = tuple(a + 1 for a in channel_axes)
        kept = {0, *channel_axes}
        rank += 1
    else:
        kept = set(channel_axes)
    axes = [i for i in range(rank) if i not in kept]
    count, shift, relative, variance = _moments(xs, axes, weights)
    if synchronized and all_sum is not None:
        count, shift, relative, variance = _merged(count, shift, relative, variance, all_sum)
    # The statistics; the output is formed from xs - shift (exact for data
    # near it) and the small relative mean, not from this mean, which in
    # float32 at 1e6 is itself off by up to 0.03.
    mean = shift + relative

    def broadcast(v):
        return ops.per_channel(v, rank, channel_axes, sizes)

    inv = K.rsqrt(variance + K.convert_to_tensor(epsilon, stat_dtype))
    r = d = None
    if correction is not None:
        r, d = (K.stop_gradient(t) for t in correction(mean, variance, broadcast))
    scale, offset = ops.affine_terms(
        inv, gamma=None if gamma is None else broadcast(gamma),
        beta=None if beta is None else broadcast(beta), r=r, d=d)
    # From xs - shift, exact for data near the shift, where x * a + b would
    # lose digits to a large offset; the small relative mean joins the
    # per-channel offset, which spares a full-size subtraction (XLA's dense
    # 4096x256 train step: 1.18x -> 0.87x of Keras's, measured in isolation).
    offset = -relative * scale if offset is None else offset - relative * scale
    y = (xs - shift) * scale + offset
    y = K.cast(K.reshape(y, K.shape(x)), x.dtype)

    def to_vector(t):
        if virtual_batch_size is not None:
            # Moving statistics follow the mean over sub-batches, and the
            # count is a sub-batch's (what n / (n - 1) needs).
            t = K.mean(t, 0, keepdims=True)
        return K.stop_gradient(K.reshape(t, [-1]))

    return y, ops.BatchStats(to_vector(count), to_vector(mean), to_vector(variance))


def infer(x, *, mean, variance, gamma, beta, epsilon, axis, fused=None, caller="batch_norm"):
    """Inference-mode normalization with the given (C,) statistics, centred
    first (`ops.normalize`)."""
    route(x, axis, epsilon, training=False, fused=fused, caller=caller)
    return ops.normalize(x, mean=mean, variance=variance, gamma=gamma, beta=beta,
                         epsilon=epsilon, axis=axis)


def after(y, update):
    """Runs `update()` once y is computed: eager backends and jit-traced
    code keep program order, so plainly."""
    update()
    return y


def cond(pred, if_true, if_false):
    return K.cond(pred, if_true, if_false)


def dynamic_shape(x):
    """The input's shape as a 1-D int32 tensor (tf_keras's `tf.shape`)."""
    return K.convert_to_tensor(list(K.shape(x)), "int32")


def concrete_bool(value):
    """A scalar bool tensor's value where known (eager), else None (traced)."""
    known = ops.static_value(value)
    return None if known is None else bool(known)


def dense_input(inputs, caller):
    """Ragged and sparse inputs are TensorFlow's; nothing to refuse here."""
    return inputs


def runtime_equal(x, actual, expected, message):
    """Shapes are known when tracing on these backends: never reached."""
    raise ValueError(message)
