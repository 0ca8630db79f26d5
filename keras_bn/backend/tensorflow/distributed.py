"""Cross-replica plumbing for tf.distribute: which replica context a call
runs in, and the collectives that move per-channel statistics between
replicas. The arithmetic that merges them is in `keras_bn.ops`.
"""

import tensorflow as tf


def replica_context():
    """The replica context of a multi-replica step, else None.

    None outside `strategy.run` (cross-replica context) and with a single
    replica, where local statistics are already global.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def gather_rows(ctx, local):
    """Every replica's `local` tensor, stacked: [num_replicas, *local.shape].

    One all-reduce: each replica contributes a zero tensor holding its own
    row at its replica id, so the sum is the stack of all rows. For a few
    per-channel vectors this costs less than separate collectives, and the
    rows stay apart so they can be merged exactly rather than summed.
    """
    onehot = tf.one_hot(ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync,
                        dtype=local.dtype)
    onehot = tf.reshape(onehot, [-1] + [1] * local.shape.rank)
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, onehot * local[None])


def all_sum(ctx, value):
    """The sum of `value` over all replicas."""
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def replica_moments(ctx, count, mean, variance, merge, shift=None):
    """Every replica's (C,) count, mean and variance, gathered in one
    all-reduce and merged by `merge` (`ops.merge_moments` for the global
    batch's statistics, `ops.pooled_moments` for the replicas' average).

    With `shift`, each replica's mean is relative to its own shift (see
    `ops.moments_about`). The parts are merged relative to one common
    shift, the one of the replica with the most values: the differences of
    shifts and the relative means are small, so the merge's squared
    distances lose nothing to a large common offset.

    Returns:
        (count, common shift, mean relative to it, variance), the same on
        every replica; the common shift is 0 without `shift`.
    """
    # An empty replica batch has NaN statistics; its count of 0 drops it.
    mean = tf.where(count > 0, mean, 0.0)
    variance = tf.where(count > 0, variance, 0.0)
    if shift is None:
        rows = gather_rows(ctx, tf.stack([count, mean, variance]))
        count, merged_mean, merged_variance = merge(rows[:, 0], rows[:, 1], rows[:, 2])
        return count, tf.zeros_like(merged_mean), merged_mean, merged_variance
    own_shift = tf.where(count > 0, shift, 0.0)
    rows = gather_rows(ctx, tf.stack([count, own_shift, mean, variance]))
    counts, shifts = rows[:, 0], rows[:, 1]
    most = tf.argmax(counts, 0)
    common = tf.gather(tf.transpose(shifts), most[:, None], batch_dims=1)[:, 0]
    count, merged_mean, merged_variance = merge(
        counts, (shifts - common) + rows[:, 2], rows[:, 3])
    return count, common, merged_mean, merged_variance
