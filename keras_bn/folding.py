"""Folding batch norms into the layers before them, for inference.

In inference a batch norm is the per-channel map `x * a + b`
(`keras_bn.ops.scale_and_offset`). After a linear layer `z = x @ W + c` that
is `x @ (W * a) + (c * a + b)`: the same layer with a rescaled kernel and a
new bias, and one pass over the activations less. `fold_batch_norms` rewrites
a model that way; a batch norm with no such layer before it becomes a
`ChannelAffine`, which stores `a` and `b` instead of the four statistics.
"""

import collections

import keras
import numpy as np

from keras import ops as K

from keras_bn import checks
from keras_bn import ops
from keras_bn import private_api
from keras_bn.layer import BATCH_NORM_TYPES
from keras_bn.layer import BatchNorm

# Exact types, not subclasses: a subclass may give its kernel another meaning.
_FOLDABLE = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


@keras.saving.register_keras_serializable(package="keras_bn")
class ChannelAffine(keras.layers.Layer):
    """A fixed per-channel affine map: `y = x * scale + offset`.

    This is what a batch norm computes in inference, with its two vectors
    stored instead of its four statistics. `fold_batch_norms` puts one in the
    place of each batch norm it cannot fold into the layer before.

    The weights `scale` and `offset` are not trainable and, as a batch norm's,
    are float32 under mixed precision; half-precision inputs are computed in
    float32 and the output has the layer's compute dtype.

    Args:
        axis: Integer, the channel axis; negative counts from the end.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of rank >= 2 with the built number of channels on
            `axis`.
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = checks.single_axis(axis, self._caller)
        self.supports_masking = True
        self.scale = None
        self.offset = None

    @property
    def _caller(self):
        return f"ChannelAffine '{self.name}'"

    def build(self, input_shape):
        shape = (checks.known_channels(input_shape, self.axis, self._caller),)
        dtype = ops.statistics_dtype(self.variable_dtype)
        self.scale = self.add_weight(
            shape=shape, name="scale", initializer="ones", dtype=dtype,
            trainable=False, autocast=False,
        )
        self.offset = self.add_weight(
            shape=shape, name="offset", initializer="zeros", dtype=dtype,
            trainable=False, autocast=False,
        )

    def call(self, inputs):
        x = K.convert_to_tensor(inputs)
        axis = checks.channel_axis(len(x.shape), self.axis, self._caller)
        dtype = ops.statistics_dtype(x.dtype)
        return ops.affine(x, a=K.cast(self.scale, dtype), b=K.cast(self.offset, dtype),
                          axis=axis)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["axis"] = self.axis
        return config


def _numpy64(value):
    if value is None:
        return None
    return keras.ops.convert_to_numpy(value).astype(np.float64)


def _inference_map(bn):
    """The batch norm's inference map `x * a + b`, as float64 NumPy (a, b)."""
    mean, variance, gamma, beta = (
        None if v is None else K.convert_to_tensor(_numpy64(v))
        for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)
    )
    a, b = ops.scale_and_offset(mean=mean, variance=variance, gamma=gamma, beta=beta,
                                epsilon=bn.epsilon)
    return K.convert_to_numpy(a), K.convert_to_numpy(b)


def _channel_axis(layer, rank):
    """The axis of `layer`'s output that holds its kernel's output channels."""
    if isinstance(layer, keras.layers.Dense):
        return rank - 1
    return 1 if layer.data_format == "channels_first" else rank - 1


def _can_fold(layer, bn, shape):
    """Whether `bn`, applied to `layer`'s output of `shape`, folds into it."""
    if (
        type(layer) not in _FOLDABLE
        or layer.get_config().get("activation") != "linear"
        or getattr(layer, "quantization_mode", None) is not None
        or getattr(layer, "lora_enabled", False)
    ):
        return False
    rank = len(shape)
    axis = _channel_axis(layer, rank)
    if axis != rank - 1 and shape[-1] in (None, shape[axis]):
        # Keras's TensorFlow `ops.add` takes a (1, C, 1, ...) bias for a
        # channels-last one when the last dimension also has size C (Keras
        # 3.15), so a bias added to this layer could land on the wrong axis.
        return False
    return bn.axis % rank == axis


def _folded_weights(layer, a, b):
    """`layer`'s [kernel, bias] with `x * a + b` applied to its output."""
    kernel = _numpy64(layer.kernel)
    if isinstance(layer, _DEPTHWISE):
        # Output channel c * depth_multiplier + m comes from kernel[..., c, m].
        kernel = kernel * a.reshape(kernel.shape[-2:])
    else:
        kernel = kernel * a
    bias = b if layer.bias is None else _numpy64(layer.bias) * a + b
    dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
    return [kernel.astype(dtype), bias.astype(dtype)]


def _plan(model):
    """Which batch norms fold into which layers: ({id(layer): bn}, {id(bn)}).

    A batch norm folds when it is called once, on the only output of a
    foldable layer that is called once and whose output feeds nothing else
    (not even the model's outputs).
    """
    nodes = private_api.call_nodes(model)
    calls, uses = collections.Counter(), collections.Counter()
    producers = {}
    for node in nodes:
        calls[id(node.operation)] += 1
        for x in node.input_tensors:
            uses[id(x)] += 1
        for x in node.outputs:
            producers[id(x)] = node.operation
    for x in model.outputs:
        uses[id(x)] += 1
    folds = {}
    for node in nodes:
        bn = node.operation
        if not isinstance(bn, BATCH_NORM_TYPES) or calls[id(bn)] != 1:
            continue
        if len(node.input_tensors) != 1:
            continue
        x = node.input_tensors[0]
        layer = producers.get(id(x))
        if (
            layer is not None
            and calls[id(layer)] == 1
            and uses[id(x)] == 1
            and _can_fold(layer, bn, x.shape)
        ):
            folds[id(layer)] = bn
    return folds, {id(bn) for bn in folds.values()}


class _Folder:
    """Clones a model's layers for `fold_batch_norms`, then their weights."""

    def __init__(self, model):
        self.folds, self.folded = _plan(model)
        self.pending = {}  # id(clone) -> (clone, weights to set once built)

    def clone(self, layer):
        if isinstance(layer, keras.Model):
            return fold_batch_norms(layer)
        if id(layer) in self.folded:
            return layer  # a marker: `call` passes its input through
        if isinstance(layer, BATCH_NORM_TYPES):
            clone = ChannelAffine(
                axis=layer.axis, name=layer.name, dtype=layer.dtype_policy
            )
            weights = _inference_map(layer)
        elif id(layer) in self.folds:
            config = layer.get_config()
            config["use_bias"] = True
            clone = type(layer).from_config(config)
            weights = _folded_weights(
                layer, *_inference_map(self.folds[id(layer)])
            )
        else:
            clone = type(layer).from_config(layer.get_config())
            weights = layer.get_weights()
        self.pending[id(clone)] = (clone, weights)
        return clone

    def call(self, layer, *args, **kwargs):
        if id(layer) in self.folded:
            return args[0]
        if isinstance(layer, ChannelAffine):
            outputs = layer(args[0])  # `training` and `mask` mean nothing here
        else:
            outputs = layer(*args, **kwargs)
        self.set_weights()
        return outputs

    def set_weights(self):
        for clone, weights in list(self.pending.values()):
            if clone.built:
                clone.set_weights(weights)
                del self.pending[id(clone)]


def fold_batch_norms(model):
    """Returns a copy of `model` for inference, with its batch norms folded.

    A `keras_bn.BatchNorm` or `keras.layers.BatchNormalization` is folded
    into the layer before it when that layer is a `Dense`, `Conv1D`,
    `Conv2D`, `Conv3D`, `DepthwiseConv1D` or `DepthwiseConv2D` with a linear
    activation whose output channels are the batch norm's `axis` (-1, or 1
    after a channels-first convolution), the layer is called once in the
    model, and its output feeds nothing but the batch norm. Its kernel
    becomes `kernel * a` and its bias `bias * a + b` (a bias is added where
    there was none), with `a, b` the batch norm's inference map `x * a + b`
    from the moving statistics; the batch norm disappears. Every other batch
    norm becomes a `ChannelAffine` layer computing the same `x * a + b`. So
    does one after a channels-first convolution whose output's last
    dimension is unknown or equals its channel count: Keras (3.15) would add
    the new bias on the last axis there.

    The arithmetic is done in float64 NumPy and the result cast to the
    kernel's dtype. The other layers are copies (same config, same weights),
    layer names are kept (a `ChannelAffine` takes its batch norm's name), and
    nested Sequential and functional models are folded in turn; a batch norm
    is never folded across a model's boundary. `model` is left untouched and
    shares no variable with the copy. The copy computes what `model` computes
    in inference (`training=False`), within float rounding, and is compiled
    as `model` was if `model` was compiled.

    A `BatchNorm` with a list of several axes is refused (ValueError): its
    scale varies per position of those axes.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.

    Returns:
        A new `keras.Model` of the same kind.
    """
    checks.graph_model(model, "fold_batch_norms")
    is_sequential = isinstance(model, keras.Sequential)
    if is_sequential and not model.built:
        raise ValueError(
            f"fold_batch_norms: the Sequential model '{model.name}' is not "
            "built; start it with a keras.Input or call it on data first."
        )
    for layer in model.layers:
        if isinstance(layer, BatchNorm) and not isinstance(layer.axis, int):
            raise ValueError(
                "fold_batch_norms: argument `model` must hold batch norms with "
                f"a single channel axis; received BatchNorm '{layer.name}' with "
                f"axis={layer.axis} in model '{model.name}': its scale varies "
                "over several axes, which neither the kernel of the layer before "
                "it (scaled per output channel) nor a ChannelAffine (one channel "
                "axis) can hold."
            )
    folder = _Folder(model)
    if not is_sequential:
        return keras.models.clone_model(
            model, clone_function=folder.clone, call_function=folder.call
        )
    clones = [folder.clone(layer) for layer in model.layers]
    kept = [clone for clone in clones if id(clone) not in folder.folded]
    x = model.inputs[0]
    folded = keras.Sequential(
        [keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name), *kept],
        name=model.name,
        trainable=model.trainable,
    )
    folder.set_weights()
    if model.compiled:
        folded.compile_from_config(model.get_compile_config())
    return folded
