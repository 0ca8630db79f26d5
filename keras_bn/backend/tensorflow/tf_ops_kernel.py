"""The TF-ops kernel: training-mode batch norm from plain TensorFlow ops.

It serves every case the fused kernel can't (float64, ghost batches,
masks, renormalization, statistics synchronized across replicas) and the
ones where it is faster (channels-first on a CPU, under XLA). The backward
pass is written by hand and is itself differentiable, to any order.
"""

import collections

import tensorflow as tf

from keras_bn.backend.tensorflow import distributed
from keras_bn.backend.tensorflow import one_side
from keras_bn.backend.tensorflow import private_api
from keras_bn import ops


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


def train(x, *, gamma, beta, epsilon, axis, replica_ctx=None,
          virtual_batch_size=None, mask=None, correction=None):
    """Training-mode batch norm from TF ops, with a lean custom gradient.

    The statistics are a plain staged two-pass; for a batch in which some
    channel's mean is more than 10 standard deviations from zero, two more
    passes take them again about that first mean (`ops.moments_about`; a
    masked batch always does; under XLA some batches are summed about a
    sample mean instead, `statistics`). The output and the gradient are
    formed from x - shift with that mean as the shift, which batch norm doesn't
    see, so that a large common offset costs no digits. The backward pass
    keeps only x, the shift, the mean and the inverse std (not the
    normalized tensor) and needs two per-channel sums, sum(dy) and
    sum(dy * (x - mean)), reduced side by side so that XLA fuses them into
    one pass over dy and x. Gradients of any order are exact: the backward
    pass reads the statistics through `_attached`, which gives an outer tape
    their derivatives with respect to x.

    Args:
        axis: the non-negative channel axis, or a sorted tuple of them:
            statistics per position of those axes, the (C,) vectors
            running row-major over them.
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
    stat_dtype = ops.statistics_dtype(x.dtype)
    has_gamma, has_beta = gamma is not None, beta is not None
    x_shape = tf.shape(x)
    lay = layout(x, axis, virtual_batch_size, mask, stat_dtype)
    view, axes, rank, w = lay.view, lay.axes, lay.rank, lay.weights
    channel_axes, per_group = lay.channel_axes, lay.per_group

    def stats_of(xs, x_view):
        return statistics(xs, x_view, axes, w, stat_dtype, always_exact=replica_ctx is not None)

    def broadcast(v):
        return v if v.shape.rank == rank else ops.per_channel(v, rank, channel_axes, lay.sizes)

    def total(t):
        """A per-channel cotangent summed over replicas: every replica's
        loss depends on this replica's x through the global statistics."""
        return t if replica_ctx is None else distributed.all_sum(replica_ctx, t)

    def masked(t):
        return t if w is None else t * w

    @tf.custom_gradient
    def forward(x, *params):
        xs = view(tf.cast(x, stat_dtype))
        count, shift, mean, variance, relative = stats_of(xs, view(x))
        if replica_ctx is None:
            batch_mean = shift + mean
        else:
            shape = tf.shape(mean)
            shift = tf.broadcast_to(shift, shape)
            count, common, mean, variance = (tf.reshape(t, shape) for t in distributed.replica_moments(
                replica_ctx, *(tf.reshape(t, [-1]) for t in (count, mean, variance)),
                ops.merge_moments, shift=tf.reshape(shift, [-1])))
            # The same on every replica; this replica normalizes with the
            # global mean relative to its own shift.
            batch_mean = common + mean
            mean = mean + (common - shift)
        mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
        inv = tf.math.rsqrt(variance + tf.constant(epsilon, stat_dtype))
        n = tf.maximum(count, 1.0)
        r = d = None
        if correction is not None:
            r, d = (tf.stop_gradient(t) for t in correction(batch_mean, variance, broadcast))

        # The statistics as functions of x, for the backward pass (see
        # `_attached`); each derivative reads the others the same way, so
        # every order is exact.
        def mean_vjp(g):
            # d mean / dx = w / n, spread over every position that counts.
            return to_x(masked(tf.broadcast_to(total(g) / n, tf.shape(xs))))

        def centered_of(x):
            # x - mean as (x - shift) - mean, both differences small; the
            # second only where the relative mean may be nonzero, which in
            # a graph is a per-call choice (a pass over the batch saved).
            if relative is True or not one_side.in_plain_graph():
                value = (xs - shift) - mean
            else:
                value = one_side.one_side(
                    relative, lambda xs, shift, mean: ((xs - shift) - mean,),
                    lambda xs, shift, _: (xs - shift,), xs, shift, mean)[0]
            return _attached(value, x, lambda g: to_x(g) - mean_vjp(
                tf.reduce_sum(g, axes, keepdims=True)))

        def inv_of(x):
            def vjp(g):
                # d inv = -inv^3 / 2 * d var, d var / dx = 2 w (x - mean) / n
                inv_x = inv_of(x)
                return to_x(masked(-total(g) * inv_x * inv_x * inv_x / n * centered_of(x)))
            return _attached(inv, x, vjp)

        def to_x(t):
            return tf.cast(tf.reshape(t, x_shape), x.dtype)

        def affine(inv, params):
            return ops.affine_terms(inv, gamma=broadcast(params[0]) if has_gamma else None,
                                beta=broadcast(params[-1]) if has_beta else None, r=r, d=d)

        scale, offset = affine(inv, params)
        # From the shifted input: x * a + b would cancel two large terms
        # when |mean| >> std and lose digits; both terms here are small.
        bias = -mean * scale if offset is None else offset - mean * scale
        y = (xs - shift) * scale + bias

        def backward(dy, *_):
            dy = view(tf.cast(dy, stat_dtype))
            inv_x, centered = inv_of(x), centered_of(x)
            scale, _ = affine(inv_x, params)
            sum_dy = ops.staged(tf.reduce_sum, dy, axes)
            sum_dy_centered = ops.staged(tf.reduce_sum, dy * centered, axes)
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
                grads.append(_to_vector(grad_gamma, per_group, channel_axes))
            if has_beta:
                grads.append(_to_vector(sum_dy, per_group, channel_axes))
            if replica_ctx is not None:
                sums = distributed.all_sum(
                    replica_ctx, tf.stack([sum_dy, sum_dy_centered]))
                sum_dy, sum_dy_centered = sums[0], sums[1]
            dx = scale * (dy - masked(
                sum_dy / n + centered * (inv_x * inv_x) * (sum_dy_centered / n)))
            return (to_x(dx), *grads)

        y = tf.cast(tf.reshape(y, x_shape), x.dtype)
        return (y, count, tf.stop_gradient(batch_mean), variance), backward

    params = [p for p in (gamma, beta) if p is not None]
    y, count, mean, variance = forward(x, *params)
    # Moving statistics follow the mean over sub-batches with ghost batches.
    count, mean, variance = (
        _to_vector(t, per_group, channel_axes, tf.reduce_mean) for t in (count, mean, variance))
    return y, ops.BatchStats(count, mean, variance)


def _to_vector(t, per_group, channel_axes, reduce=tf.reduce_sum):
    """A keepdims statistic -> (C,), reducing a ghost-batch axis 0 if any."""
    if 0 in per_group and 0 not in channel_axes:
        t = reduce(t, 0, keepdims=True)
    return tf.reshape(t, [-1])


Layout = collections.namedtuple(
    "Layout", ["view", "channel_axes", "sizes", "per_group", "axes", "rank", "weights"])


def layout(x, axis, virtual_batch_size, mask, stat_dtype):
    """How `train` reduces x: `view` (x, or x as [G, v, ...] ghost batches),
    the channel axes in the view with their `sizes` (None for one axis),
    the axes kept per statistic (`per_group`), those reduced (`axes`), the
    view's rank, and the mask as weights of the view's shape (or None)."""
    rank = x.shape.rank
    x_shape = tf.shape(x)
    weights = None
    if mask is not None:
        # Broadcast in full: a mask of size 1 along a reduced axis still
        # counts every position there.
        weights = tf.broadcast_to(tf.cast(mask, stat_dtype), x_shape)
    # Several channel axes: the (C,) vectors run row-major over them.
    channel_axes, sizes = ops.axes_of(axis), ops.sizes_on(x, axis)
    if virtual_batch_size is not None:
        # [N, ...] -> [G, v, ...]: sub-batch g holds examples g*v .. g*v+v-1.
        ghost_shape = tf.concat([[-1, virtual_batch_size], x_shape[1:]], 0)
        view = lambda t: tf.reshape(t, ghost_shape)  # noqa: E731
        channel_axes = tuple(a + 1 for a in channel_axes)
        per_group = {0, *channel_axes}
        rank += 1
    else:
        view = lambda t: t  # noqa: E731
        per_group = set(channel_axes)
    axes = [i for i in range(rank) if i not in per_group]
    return Layout(view, channel_axes, sizes, per_group, axes, rank,
                  None if weights is None else view(weights))


def statistics(xs, x_view, axes, weights, stat_dtype, always_exact=False):
    """keepdims (count, shift, mean relative to the shift, variance) of xs
    over `axes`, and whether the relative mean may be nonzero (True, or a
    scalar bool tensor). `xs` is `x_view` in the statistics dtype.

    Under XLA for half-precision inputs and one long reduced axis, sums
    about the mean of the batch's first rows (`ops.sample_shift`,
    `ops.corrected_moments`). Otherwise a plain staged two-pass first;
    where some channel is offset-dominated (or always, with
    `always_exact`, which replicas need: an outer tape can't read a merged
    value through Switch and Merge) two more passes about its mean
    (`ops.moments_about`). With weights, always about a first weighted
    mean (`ops.weighted_moments`).
    """
    if weights is not None:
        return (*ops.weighted_moments(xs, axes, weights), True)
    count = ops.count_over(xs, axes, stat_dtype)
    if private_api.in_xla_context() and (
            xs.dtype != x_view.dtype or ops.one_long_axis(xs, axes)):
        # Sums about a sample mean, side by side in the plain two-pass's
        # passes, where XLA would make the conditional second look cost
        # passes of its own: a half-precision batch, which it would cast
        # to float32 in full as the conditional's operand; one long axis,
        # where it flattens the conditional into a select that computes
        # both sides (+12-20 % on a dense 4096x256 train step). Elsewhere
        # its library reduction of x itself is the faster first pass.
        shift = ops.sample_shift(xs, axes)
        mean, variance = ops.corrected_moments(xs, axes, shift)
        return tf.fill(tf.shape(mean), count), shift, mean, variance, True
    first_mean, first_variance = ops.staged_moments(xs, axes)
    shift = tf.stop_gradient(first_mean)
    if always_exact:
        mean, variance = ops.moments_about(xs, axes, shift)
        relative = True
    else:
        # Most batches: the first pass is exact, relative mean 0. Where a
        # channel sits far from zero, its first mean's rounding error would
        # add its square to the variance: take them again about it. The
        # side reads x uncast: a half-precision batch cast to float32 as an
        # operand would be materialized (XLA fuses the cast into the
        # reductions otherwise).
        relative = tf.reduce_any(ops.offset_dominated(first_mean, first_variance))
        mean, variance = one_side.one_side(
            relative,
            lambda x_view, shift, *_: ops.moments_about(
                tf.cast(x_view, stat_dtype), axes, shift),
            lambda x_view, shift, zero, variance: (zero, variance),
            x_view, shift, tf.zeros_like(first_variance), first_variance)
    return tf.fill(tf.shape(mean), count), shift, mean, variance, relative
