"""Inference right after a convolution, in a traced graph: the batch norm
joins the convolution instead of costing a pass of its own.

The layer sees only its input tensor; in a graph that tensor names the op
that made it. Two producers are worth reading (benchmarks/README.md, "Whole
models"):

- Conv2D, with or without a BiasAdd: TensorFlow's graph optimizer fuses
  Conv2D -> FusedBatchNorm (-> Relu/Relu6/Elu) into one op on CPU, but a
  BiasAdd in between breaks the pattern. `bias_absorbed` hands the fused
  kernel the bare convolution output and the bias inside the mean.
- DepthwiseConv2dNative (MobileNet, EfficientNet), for which no such fusion
  exists: `into_depthwise` scales its [kh, kw, C, 1] filter, a few thousand
  values, instead of normalizing the output, and adds the rest as a bias,
  which oneDNN fuses into the convolution with a following activation.

Either way the original convolution is left without consumers and pruned.
Eagerly, or for any other producer, nothing changes. Gradients are those of
the plain formula, of every order.
"""

import tensorflow as tf

from keras_bn import ops


def _data_format(axis):
    """The 4-D layout with its channel on `axis` (1 or 3)."""
    return "NHWC" if axis == 3 else "NCHW"


def _producer(x, data_format):
    """(convolution op, bias tensor or None) if `x` is a convolution's
    output, possibly through a BiasAdd, in `data_format`; else None."""
    if tf.executing_eagerly():
        return None
    op = getattr(x, "op", None)
    bias = None
    if op is not None and op.type == "BiasAdd":
        if op.get_attr("data_format").decode() != data_format:
            return None
        op, bias = op.inputs[0].op, op.inputs[1]
    if op is None or op.type not in ("Conv2D", "DepthwiseConv2dNative"):
        return None
    if op.get_attr("data_format").decode() != data_format:
        return None
    return op, bias


def _zero_with_gradient(t):
    """Zero in value, with the derivatives of `t` (of every order)."""
    return t - tf.stop_gradient(t)


def bias_absorbed(x, *, mean, variance, gamma, beta, epsilon, data_format):
    """(input, beta, mean) for the fused kernel: a Conv2D's output without
    its bias, the bias inside the mean; otherwise the arguments unchanged.

    In inference mode the kernel differentiates neither statistic, so the
    bias's gradient, gamma * rsqrt(variance + epsilon) per unit of output,
    comes through the offset by a term that is zero in value.
    """
    found = _producer(x, data_format)
    if found is None or found[0].type != "Conv2D" or found[1] is None:
        return x, beta, mean
    bias = tf.cast(found[1], mean.dtype)
    return (found[0].outputs[0],
            beta + _zero_with_gradient(bias) * ops.scale(
                variance=variance, gamma=gamma, epsilon=epsilon),
            mean - tf.stop_gradient(bias))


def joins(x, axis):
    """"Conv2D" or "DepthwiseConv2dNative" if the batch norm of `x`, channels
    on `axis`, can join the convolution that made it; else None.

    Conv2D only where the graph optimizer fuses it: a float32 output (its
    CPU fusion's only dtype), channels-last or, with oneDNN, either layout.
    Only a single channel axis is a convolution's.
    """
    if x.shape.rank != 4 or not isinstance(axis, int) or axis not in (1, 3):
        return None
    found = _producer(x, _data_format(axis))
    if found is None:
        return None
    if found[0].type == "Conv2D" and x.dtype != tf.float32:
        return None
    return found[0].type


def into_depthwise(x, *, mean, variance, gamma, beta, epsilon, axis):
    """Inference batch norm of a depthwise convolution's output, as that
    convolution with a scaled filter plus a bias; y in x's dtype.

    Requires `joins(x, axis) == "DepthwiseConv2dNative"`.
    """
    data_format = _data_format(axis)
    conv, bias = _producer(x, data_format)
    if bias is not None:
        # beta - (mean - bias) * a: with mean and bias both near a large
        # offset their difference is exact; beta - mean * a + bias * a
        # would round both products at the offset's magnitude.
        mean = mean - tf.cast(bias, mean.dtype)
    a, b = ops.scale_and_offset(mean=mean, variance=variance, gamma=gamma, beta=beta,
                                epsilon=epsilon)
    inputs, kernel = conv.inputs
    # The filter's channel multiplier m: output channel c * m + k comes from
    # input channel c, so a's [C * m] values reshape to [C, m].
    scaled = kernel * tf.cast(tf.reshape(a, [kernel.shape[2], -1]), kernel.dtype)
    y = tf.raw_ops.DepthwiseConv2dNative(
        input=inputs, filter=scaled, strides=conv.get_attr("strides"),
        padding=conv.get_attr("padding"),
        explicit_paddings=conv.get_attr("explicit_paddings"),
        data_format=data_format, dilations=conv.get_attr("dilations"))
    return tf.nn.bias_add(y, tf.cast(b, y.dtype), data_format=data_format)
