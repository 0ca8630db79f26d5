"""The one place that picks a kernel for a call, and runs it.

`route` returns the choice with its reason, as data a test (or a curious
user) can read; `train` and `infer` run the chosen kernel. The speed
reasons were measured on CPU (benchmarks/README.md, "Layer benchmark"):
the fused kernel wins for channels-last data; its channels-first form is
slower than TF ops; under XLA, which fuses plain ops, TF ops win. On a GPU
cuDNN takes either layout natively.
"""

import collections

import tensorflow as tf

from keras_bn import distributed
from keras_bn import fused_kernel
from keras_bn import ops
from keras_bn import private_api
from keras_bn import tf_ops_kernel

FUSED = "fused"
TF_OPS = "tf_ops"

Route = collections.namedtuple("Route", ["kernel", "reason"])


def fused_is_faster(x, axis):
    """Whether the fused kernel beats TF ops for a call it can serve."""
    if private_api.in_xla_context():
        return False
    return axis == x.shape.rank - 1 or fused_kernel.gpu_visible()


def route(x, axis, epsilon, *, training, fused=None, features=(), caller="batch_norm"):
    """The kernel for one call, and why.

    Args:
        x: the input; `axis` its non-negative channel axis.
        training: True, False, or a symbolic flag (counts as training: that
            branch has the kernel's epsilon limit).
        fused: the user's choice: None (pick), True (require the kernel),
            False (TF ops).
        features: names of the options in use that only TF ops compute
            ("synchronized", "virtual_batch_size", "mask", "renorm").
        caller: who raises, in an error message.

    Raises:
        ValueError: fused=True for a call the kernel can't serve.
    """
    if fused is False:
        return Route(TF_OPS, "fused=False")
    if training is not False and features:
        if fused:
            raise ValueError(
                f"{caller}: fused=True, but the kernel computes plain "
                f"per-replica statistics only; received {', '.join(features)}.")
        return Route(TF_OPS, f"{', '.join(features)} needs TF ops")
    unsupported = fused_kernel.unsupported_reason(x, axis, epsilon, training)
    if unsupported is not None:
        if fused:
            raise ValueError(f"{caller}: fused=True, but {unsupported}.")
        return Route(TF_OPS, unsupported)
    if fused:
        return Route(FUSED, "fused=True")
    if training is False and x.shape.rank != 4:
        # Outside 4-D, the kernel's reshapes keep converters (TFLite) from
        # folding the batch norm into the layer before it; a served model
        # gains more from that than from one pass instead of two.
        return Route(TF_OPS, f"inference of a rank-{x.shape.rank} input")
    if fused_is_faster(x, axis):
        return Route(FUSED, "faster here")
    return Route(TF_OPS, "faster here")


def train(x, gamma, beta, *, epsilon, axis, fused=None, synchronized=False,
          virtual_batch_size=None, mask=None, correction=None, caller="batch_norm"):
    """Training-mode normalization with batch statistics; no moving update.

    Arguments as in `keras_bn.batch_norm`, already checked and converted
    (`axis` non-negative, gamma/beta in the statistics dtype), plus those of
    `tf_ops_kernel.train`.

    Returns:
        (y, BatchStats) where the statistics are those the moving averages
        should follow, carrying no gradient: in a multi-replica step, the
        same on every replica.
    """
    replica_ctx = distributed.replica_context()
    synchronize = bool(synchronized) and replica_ctx is not None
    features = [name for name, on in (
        ("synchronized", synchronize), ("virtual_batch_size", virtual_batch_size),
        ("mask", mask is not None), ("renorm", correction is not None)) if on]
    chosen = route(x, axis, epsilon, training=True, fused=fused, features=features,
                   caller=caller)
    if chosen.kernel == FUSED:
        y, stats = fused_kernel.train(x, gamma, beta, epsilon, axis)
    else:
        y, stats = tf_ops_kernel.train(
            x, gamma, beta, epsilon, axis,
            replica_ctx=replica_ctx if synchronize else None,
            virtual_batch_size=virtual_batch_size, mask=mask,
            correction=correction, short_axis_plain=private_api.in_xla_context())
    stats = ops.BatchStats(*(tf.stop_gradient(t) for t in stats))
    if replica_ctx is not None and not synchronize:
        # Each replica normalized with its own statistics; the moving ones
        # follow their count-weighted average, identical on every replica.
        stats = ops.BatchStats(*distributed.replica_moments(
            replica_ctx, stats.count, stats.mean, stats.variance, ops.pooled_moments))
    return y, stats


def infer(x, mean, variance, gamma, beta, *, epsilon, axis, fused=None,
          caller="batch_norm"):
    """Inference-mode normalization with the given (C,) statistics."""
    if route(x, axis, epsilon, training=False, fused=fused, caller=caller).kernel == FUSED:
        return fused_kernel.infer(x, gamma, beta, mean, variance, epsilon, axis)
    return ops.normalize(x, mean, variance, gamma, beta, epsilon, axis)

