"""The one place that picks a kernel for a call, and runs it.

`route` returns the choice with its reason, as data a test (or a curious
user) can read; `train` and `infer` run the chosen kernel. The speed
reasons were measured per CPU kind (benchmarks/README.md, "Kernel choice"):
in training the fused kernel has a fixed cost per call (its accuracy
guard's second, 4-row kernel, the custom gradient) that a tiny tensor does
not repay; its channels-first form is slower than TF ops; under XLA, which
fuses plain ops, TF ops win. On a GPU cuDNN takes either layout natively. In a graph, an
inference right after a convolution joins it (`conv_fold`).
"""

import collections

import numpy as np
import tensorflow as tf

from keras_bn import checks
from keras_bn.backend.tensorflow import conv_fold
from keras_bn.backend.tensorflow import distributed
from keras_bn.backend.tensorflow import fused_kernel
from keras_bn.backend.tensorflow import one_side
from keras_bn import ops
from keras_bn.backend.tensorflow import private_api
from keras_bn.backend.tensorflow import tf_ops_kernel

FUSED = "fused"
TF_OPS = "tf_ops"
DEPTHWISE_FOLD = "depthwise_fold"
# Inference by TF ops in the x * a + b form (`ops.affine`) that converters
# fold into the layer before it; TF_OPS's inference is centred first
# (`ops.normalize`), exact at any offset.
FOLDABLE = "foldable"

Route = collections.namedtuple("Route", ["kernel", "reason"])


# The fewest values (N * H * W * C) of a channels-last input for which the
# fused kernel serves a traced call, per (CPU kind, training, half
# precision), rather than TF ops (benchmarks/README.md, "Kernel choice").
# Alone in a function, the kernel's fixed cost per call (the accuracy
# guard's second kernel, the custom gradient) loses to TF ops below 2^17
# values on either kind (up to 1.9x Keras's time at 2^13 where TF ops take
# 1.0x). In whole models less of it shows, and the kernel keeps less memory
# and traces faster: the limits are where whole models were fastest
# (MobileNetV2's train step: all-kernel 0.96x of Keras's with oneDNN and
# 1.07x on Eigen, TF ops everywhere 1.03x on Eigen, TF ops below 2^16
# values 0.91x and 0.97x); inference is fastest with the kernel at any size.
FUSED_FROM = {
    ("onednn", True, False): 2**16,
    ("onednn", True, True): 2**16,
    ("onednn", False, False): 0,
    ("onednn", False, True): 0,
    ("eigen", True, False): 2**16,
    ("eigen", True, True): 2**16,
    ("eigen", False, False): 0,
    ("eigen", False, True): 0,
}
# Where a dense (rank-2) input takes TF ops at any size: float32 training
# on an Eigen CPU, where the kernel never beat them (256x4096: 1.15x of
# Keras's time against TF ops' 1.01x; 4096x256: 1.06x against 0.86x) and
# no whole model had a dense batch norm to weigh against that.
DENSE_TF_OPS = {("eigen", True, False)}


def cpu_kind():
    """"onednn" or "eigen": which CPU kernels TensorFlow runs here."""
    return "onednn" if private_api.onednn_enabled() else "eigen"


def _values(x):
    """The number of values in x, an unknown dimension counted as 32 (Keras's
    default batch size: a traced `fit` may leave the batch unknown)."""
    return int(np.prod([32 if d is None else d for d in x.shape.as_list()], dtype=np.int64))


def fused_is_faster(x, axis, training=True):
    """(whether the fused kernel beats TF ops for a call it can serve, why)."""
    if private_api.in_xla_context():
        return False, "under XLA, which fuses TF ops"
    if fused_kernel.gpu_visible():
        return True, "cuDNN on the GPU"
    if ops.axes_of(axis)[-1] != x.shape.rank - 1:
        return False, "channels-first on CPU"
    if tf.executing_eagerly():
        return True, "eagerly, one kernel instead of many ops"
    kind = cpu_kind()
    half = x.dtype in (tf.float16, tf.bfloat16)
    key = (kind, training is not False, half)
    where = (f"{'training' if training is not False else 'inference'} of "
             f"{'half-precision' if half else 'float32'} values with "
             f"{'oneDNN' if kind == 'onednn' else 'Eigen (oneDNN off)'}")
    if x.shape.rank == 2 and key in DENSE_TF_OPS:
        return False, f"{where}: TF ops at any size for a dense input"
    least = FUSED_FROM[key]
    values = _values(x)
    if values >= least:
        return True, f"{where}: {values} values, the kernel from {least}"
    return False, f"{where}: {values} values, TF ops below {least}"


def route(x, axis, epsilon, *, training, fused=None, features=None, caller="batch_norm"):
    """The kernel for one call, and why.

    Args:
        x: the input; `axis` its non-negative channel axis, or a sorted
            tuple of them (statistics per position of several axes: the
            kernel serves a block of neighbouring ones, reshaped into one).
        training: True, False, or a symbolic flag (counts as training: that
            branch has the kernel's epsilon limit).
        fused: the user's choice: None (pick), True (require the kernel),
            False (TF ops).
        features: the options in use that only TF ops compute, as a dict
            from name ("synchronized", "virtual_batch_size", "mask",
            "renorm", "adjustment") to the value received.
        caller: who raises, in an error message.

    Raises:
        ValueError: fused=True for a call the kernel can't serve.
    """
    if fused is False:
        return _by_ops(training, "fused=False")
    if training is not False and features:
        checks.fused_conflicts(fused, caller, **features)
        return Route(TF_OPS, f"{', '.join(features)} needs TF ops")
    unsupported = fused_kernel.unsupported_reason(x, axis, epsilon, training)
    if unsupported is not None:
        if fused:
            raise ValueError(f"{caller}: fused=True, but {unsupported}.")
        return _by_ops(training, unsupported)
    if fused:
        return Route(FUSED, "fused=True")
    joins = conv_fold.joins(x, axis) if training is False else None
    if joins == "Conv2D":
        return Route(FUSED, "inference of a Conv2D's output in a graph: fused into it")
    if joins == "DepthwiseConv2dNative":
        return Route(DEPTHWISE_FOLD, "inference of a DepthwiseConv2dNative's output "
                                     "in a graph: into its filter")
    if training is False and x.shape.rank != 4 and one_side.in_plain_graph():
        # Outside 4-D, the kernel's reshapes keep converters (TFLite) from
        # folding the batch norm into the layer before it; a served model
        # gains more from that than from one pass instead of two.
        return _by_ops(training, f"inference of a rank-{x.shape.rank} input")
    faster, why = fused_is_faster(x, axis, training)
    return Route(FUSED, f"faster here: {why}") if faster else _by_ops(
        training, f"faster here: {why}")


def _by_ops(training, reason):
    """TF ops; in inference the foldable form where a converter may see it
    (a traced graph outside XLA; nothing converts an eager call or an XLA
    cluster)."""
    if training is False and one_side.in_plain_graph():
        return Route(FOLDABLE, f"{reason}; x * a + b, which converters fold")
    return Route(TF_OPS, reason)


def train(x, *, gamma, beta, epsilon, axis, fused=None, synchronized=False,
          virtual_batch_size=None, mask=None, correction=None, adjustment=None,
          caller="batch_norm"):
    """Training-mode normalization with batch statistics; no moving update.

    Arguments as in `keras_bn.batch_norm`, already checked and converted
    (`axis` non-negative, gamma/beta in the statistics dtype), plus those of
    `tf_ops_kernel.train`, and `adjustment`: None, or (scale, bias), (C,)
    tensors in the statistics dtype applied to the normalized values before
    gamma and beta (`BatchNorm`'s `adjustment`, already called and checked).

    Returns:
        (y, BatchStats) where the statistics are those the moving averages
        should follow, carrying no gradient: in a multi-replica step, the
        same on every replica.
    """
    replica_ctx = distributed.replica_context()
    synchronize = bool(synchronized) and replica_ctx is not None
    # What the user set, as far as it is known here: renorm and an
    # adjustment arrive already turned into their effect.
    features = {name: value for name, value in (
        ("synchronized", synchronize), ("virtual_batch_size", virtual_batch_size),
        ("mask", mask), ("renorm", correction is not None),
        ("adjustment", adjustment is not None)) if value is not None and value is not False}
    chosen = route(x, axis, epsilon, training=True, fused=fused, features=features,
                   caller=caller)
    if adjustment is not None:
        adjust_scale, adjust_bias = adjustment
        gamma, beta = ops.adjusted_gamma_and_beta(
            gamma=gamma, beta=beta, adjust_scale=adjust_scale, adjust_bias=adjust_bias)
    if chosen.kernel == FUSED:
        y, stats = fused_kernel.train(x, gamma=gamma, beta=beta, epsilon=epsilon, axis=axis)
    else:
        y, stats = tf_ops_kernel.train(
            x, gamma=gamma, beta=beta, epsilon=epsilon, axis=axis,
            replica_ctx=replica_ctx if synchronize else None,
            virtual_batch_size=virtual_batch_size, mask=mask,
            correction=correction)
    stats = ops.BatchStats(*(tf.stop_gradient(t) for t in stats))
    if replica_ctx is not None and not synchronize:
        # Each replica normalized with its own statistics; the moving ones
        # follow their count-weighted average, identical on every replica.
        count, _, mean, variance = distributed.replica_moments(
            replica_ctx, stats.count, stats.mean, stats.variance, ops.pooled_moments)
        stats = ops.BatchStats(count, mean, variance)
    return y, stats


def infer(x, *, mean, variance, gamma, beta, epsilon, axis, fused=None,
          caller="batch_norm"):
    """Inference-mode normalization with the given (C,) statistics."""
    kernel = route(x, axis, epsilon, training=False, fused=fused, caller=caller).kernel
    params = dict(mean=mean, variance=variance, gamma=gamma, beta=beta, epsilon=epsilon)
    if kernel == FUSED:
        return fused_kernel.infer(x, **params, axis=axis)
    if kernel == DEPTHWISE_FOLD:
        return conv_fold.into_depthwise(x, **params, axis=axis)
    if kernel == FOLDABLE:
        a, b = ops.scale_and_offset(**params)
        return ops.affine(x, a=a, b=b, axis=axis)
    return ops.normalize(x, **params, axis=axis)

