"""Every argument and input check, with one message format.

Checks run where an argument enters (a constructor, the public op, a call)
and raise `"{caller}: argument `name` must ...; received ..."`, `caller`
being what the user called: `batch_norm`, `BatchNorm 'bn1'`. A value of the
wrong type raises TypeError, a wrong value of the right type ValueError.
Each returns the argument in the form the rest of the package uses.
"""

import numbers

import keras
import numpy as np

from keras import ops as K

from keras_bn import backend
from keras_bn import private_api

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _dtype(t):
    """A tensor's dtype name, on any backend."""
    return keras.backend.standardize_dtype(t.dtype)


def _is_floating(t):
    return "float" in _dtype(t)


def _rank(t):
    """A tensor's rank; None where unknown (a TensorFlow graph)."""
    try:
        return len(t.shape)
    except (TypeError, ValueError):
        return None


def _tensor(value, dtype):
    """`value` as a tensor, Python and NumPy numbers in `dtype` if they
    are real (TensorFlow's dtype_hint): [1, 2] is a float vector; a
    tensor or an array keeps its own dtype, for the check to name."""
    if not K.is_tensor(value) and not hasattr(value, "dtype"):
        array = np.asarray(value)
        if array.dtype.kind in "iuf":
            return K.convert_to_tensor(array, dtype)
        value = array
    return K.convert_to_tensor(value)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(value, name, caller, expected):
    if not _is_number(value):
        raise TypeError(
            f"{caller}: argument `{name}` must be {expected}; received "
            f"{name}={value!r} of type {type(value).__name__}.")


def momentum(value, caller, name="momentum"):
    """A float in [0, 1]."""
    _number(value, name, caller, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{caller}: argument `{name}` must be a number in [0, 1]; "
            f"received {name}={value!r}.")
    return float(value)


def epsilon(value, caller):
    """A finite float > 0."""
    _number(value, "epsilon", caller, "a finite number > 0")
    if not 0.0 < value < float("inf"):
        raise ValueError(
            f"{caller}: argument `epsilon` must be a finite number > 0; "
            f"received epsilon={value!r}.")
    return float(value)


def single_axis(value, caller):
    """A single int (negative counts from the end)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{caller}: argument `axis` must be a single integer; received "
            f"axis={value!r} of type {type(value).__name__}.")
    return int(value)


def axis(value, caller):
    """An int, or a list (or tuple) of ints naming each axis once.

    Returns the int, a one-entry list's int (the same layer), or a list of
    ints as given: negative entries are resolved against the input's rank
    by `channel_axis`, once it is known.
    """
    if not isinstance(value, (list, tuple)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"{caller}: argument `axis` must be an integer or a list of "
                f"integers; received axis={value!r} of type {type(value).__name__}.")
        return int(value)
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
            raise TypeError(
                f"{caller}: argument `axis` must be an integer or a list of "
                f"integers; received axis={value!r}, whose entry {entry!r} is of "
                f"type {type(entry).__name__}.")
    if not value:
        raise ValueError(
            f"{caller}: argument `axis` must be an integer or a non-empty list "
            f"of integers; received axis={value!r}.")
    axes = [int(a) for a in value]
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"{caller}: argument `axis` must name each axis once; received "
            f"axis={axes}.")
    return axes[0] if len(axes) == 1 else axes


def fused(value, caller):
    """None, True or False."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"{caller}: argument `fused` must be None, True or False; "
            f"received fused={value!r}.")
    if value and backend.NAME != "tensorflow":
        raise ValueError(
            f"{caller}: argument `fused`: fused=True requires TensorFlow's fused "
            f"kernel, which Keras's {backend.NAME} backend doesn't have; received "
            "fused=True. Pass fused=None (the default) or False.")
    return value


def virtual_batch_size(value, caller):
    """None or an int >= 1."""
    if value is None:
        return None
    message = (f"{caller}: argument `virtual_batch_size` must be None or an "
               f"integer >= 1; received virtual_batch_size={value!r}.")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(message)
    if value < 1:
        raise ValueError(message)
    return int(value)


def renorm_clipping(clipping, renorm, caller):
    """A dict with keys among rmax, rmin, dmax; each bound a number >= 0,
    a Keras LearningRateSchedule or a callable of the step."""
    if clipping is None:
        return {}
    if not isinstance(clipping, dict):
        raise TypeError(
            f"{caller}: argument `renorm_clipping` must be a dict with keys "
            f"among {CLIPPING_KEYS}; received renorm_clipping={clipping!r}.")
    if set(clipping) - set(CLIPPING_KEYS):
        raise ValueError(
            f"{caller}: argument `renorm_clipping` must be a dict with keys "
            f"among {CLIPPING_KEYS}; received renorm_clipping={clipping!r}.")
    if clipping and not renorm:
        raise ValueError(
            f"{caller}: argument `renorm_clipping` needs renorm=True; "
            f"received renorm_clipping={clipping!r} with renorm=False.")
    for key, value in clipping.items():
        if callable(value):
            continue
        message = (
            f"{caller}: renorm_clipping[{key!r}] must be a number >= 0, a "
            f"Keras LearningRateSchedule or a callable of the step; received "
            f"{value!r}.")
        if not _is_number(value):
            raise TypeError(message)
        if value < 0:
            raise ValueError(message)
    rmin, rmax = clipping.get("rmin"), clipping.get("rmax")
    if _is_number(rmin) and _is_number(rmax) and rmax < rmin:
        raise ValueError(
            f"{caller}: renorm_clipping needs rmin <= rmax; received "
            f"rmin={rmin}, rmax={rmax}.")
    return dict(clipping)


def adjustment(value, caller):
    """None, or a callable of the input's dynamic shape returning (scale, bias)."""
    if value is not None and not callable(value):
        raise TypeError(
            f"{caller}: argument `adjustment` must be None or a callable "
            f"taking the input's shape and returning (scale, bias); received "
            f"adjustment={value!r} of type {type(value).__name__}.")
    return value


def adjustment_output(pair, channels, dtype, caller):
    """What `adjustment` returned, as two (C,) tensors of `dtype`.

    Each of scale and bias has one value per channel, or one for all
    (shape (1,) or a scalar), and is broadcast to (C,).
    """
    expected = f"shape ({channels},), (1,) or ()"
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(
            f"{caller}: argument `adjustment` must return a pair (scale, "
            f"bias), each of {expected}; received {pair!r}.")
    tensors = []
    for name, value in zip(("scale", "bias"), pair):
        value = _tensor(value, dtype)
        if not _is_floating(value):
            raise TypeError(
                f"{caller}: argument `adjustment` must return a floating-point "
                f"{name}; received dtype {_dtype(value)}.")
        shape = value.shape
        rank = _rank(value)
        if rank is None or rank > 1 or (rank == 1 and shape[0] not in (None, 1, channels)):
            received = ("of unknown rank" if rank is None
                        else f"of shape {tuple(shape)}")
            raise ValueError(
                f"{caller}: argument `adjustment` must return a {name} of "
                f"{expected} (one value per channel, or one for all); "
                f"received a {name} {received}.")
        # A size known only at run time is checked by broadcast_to there.
        tensors.append(K.broadcast_to(K.cast(value, dtype), [channels]))
    return tuple(tensors)


def fused_conflicts(fused, caller, **options):
    """fused=True with an option only the TF-ops kernel computes (renorm,
    virtual_batch_size, synchronized, a mask, an adjustment).

    The rule's one home: `BatchNorm`'s constructor, its call (a
    training-mode mask) and `dispatch.route` (every other way in) ask it.
    Each option is passed as its name and the value received; None and
    False mean it is off. A tensor (a mask) is named, not printed.
    """
    if not fused:
        return
    for name, value in options.items():
        # `is`, not `in (None, False)`: that would compare a tensor by value.
        if value is None or value is False:
            continue
        received = f"a {name}" if K.is_tensor(value) else f"{name}={value!r}"
        raise ValueError(
            f"{caller}: argument `{name}` needs the TF-ops path, but "
            f"fused=True requires TensorFlow's fused kernel; received "
            f"{received} with fused=True. Pass fused=None (the default) or "
            "False.")


def graph_model(model, caller):
    """A keras.Sequential or a functional keras.Model: one whose layer graph
    is known, for conversion and folding to walk."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{caller}: argument `model` must be a keras.Sequential or a "
            "functional keras.Model; received an object of type "
            f"{type(model).__name__}.")
    if not isinstance(model, keras.Sequential) and not private_api.has_layer_graph(model):
        raise ValueError(
            f"{caller}: argument `model` must be a keras.Sequential or a "
            f"functional keras.Model; received a subclassed model "
            f"'{model.name}' of type {type(model).__name__}, whose layer graph "
            "is not known.")
    return model


def training(value, caller):
    """A Python bool, or a scalar bool tensor left to a conditional.

    An eager tensor is read at once; only a symbolic one needs both branches.
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if K.is_tensor(value) and _dtype(value) == "bool":
        if _rank(value) not in (0, None):
            raise ValueError(
                f"{caller}: argument `training` must be a scalar; received a "
                f"tensor of shape {tuple(value.shape)}.")
        known = backend.concrete_bool(value)
        return value if known is None else known
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        if str(value.dtype) == "bool":
            return bool(value)
    raise TypeError(
        f"{caller}: argument `training` must be a bool or a scalar bool "
        f"tensor; received {value!r} of type {type(value).__name__}.")


def channel_axis(rank, axis, caller):
    """`axis` as a non-negative index into a shape of `rank`, or, for a list,
    as a sorted tuple of them (the order the weights run in)."""
    if rank is None:
        raise ValueError(
            f"{caller}: the input rank must be known; received an input of "
            "unknown rank.")
    if rank < 2:
        raise ValueError(
            f"{caller}: expected an input of rank >= 2 (batch and channels); "
            f"received rank {rank}.")
    if isinstance(axis, int):
        if not -rank <= axis < rank:
            raise ValueError(
                f"{caller}: argument `axis` must be in [{-rank}, {rank}) for an "
                f"input of rank {rank}; received axis={axis}.")
        return axis % rank
    if not all(-rank <= a < rank for a in axis):
        raise ValueError(
            f"{caller}: argument `axis` must hold axes in [{-rank}, {rank}) for "
            f"an input of rank {rank}; received axis={axis}.")
    axes = tuple(sorted(a % rank for a in axis))
    if len(set(axes)) != len(axes):
        twice = next(a for a in axes if axes.count(a) > 1)
        raise ValueError(
            f"{caller}: argument `axis` must name each axis once; received "
            f"axis={axis}, which names axis {twice} twice for an input of rank "
            f"{rank}.")
    if len(axes) == rank:
        raise ValueError(
            f"{caller}: argument `axis` must leave an axis to compute the "
            f"statistics over; received axis={axis}, every axis of an input of "
            f"rank {rank}.")
    return axes


def known_channels(input_shape, axis, caller):
    """The channel count on `axis` of a build-time shape; for a list of
    axes, the tuple of their sizes (the weights' shape)."""
    input_shape = tuple(input_shape)
    axes = channel_axis(len(input_shape), axis, caller)
    if isinstance(axes, int):
        channels = input_shape[axes]
        if channels is None:
            raise ValueError(
                f"{caller}: the channel dimension (axis {axis}) of the input must "
                f"be known at build time; received input shape {input_shape}.")
        return int(channels)
    sizes = tuple(input_shape[a] for a in axes)
    if None in sizes:
        raise ValueError(
            f"{caller}: the dimensions on axis={axis} of the input must be known "
            f"at build time; received input shape {input_shape}.")
    return tuple(int(d) for d in sizes)


def batch_axis_free(axes, virtual_batch_size, axis, caller):
    """Ghost batches split axis 0, so no statistic may be kept along it."""
    if virtual_batch_size is not None and 0 in ((axes,) if isinstance(axes, int) else axes):
        raise ValueError(
            f"{caller}: argument `axis` must not name the batch axis 0 with "
            f"virtual_batch_size={virtual_batch_size}, which splits that axis "
            f"into ghost batches; received axis={axis}.")


def float_input(x, caller):
    """The op's `x`: a tensor of a floating dtype the math supports."""
    x = K.convert_to_tensor(x)
    if _dtype(x) not in FLOAT_DTYPES:
        raise TypeError(
            f"{caller}: argument `x` must be a float16, bfloat16, float32 or "
            f"float64 tensor; received dtype {_dtype(x)}.")
    return x


def layer_input(inputs, channels, axis, compute_dtype, caller, rank=None):
    """A layer's input as a dense real tensor with `channels` on `axis`.

    For a list of axes, `channels` is the tuple of their built sizes and
    `rank` the rank the layer was built for, which its negative entries
    were resolved against. Integer and bool inputs are cast to
    `compute_dtype`, as in Keras's layer. Returns (inputs, non-negative
    axis, or the sorted tuple of axes).
    """
    inputs = K.convert_to_tensor(backend.dense_input(inputs, caller))
    if isinstance(axis, int):
        inputs, axis = _channels_on_axis(inputs, channels, axis, caller)
    else:
        inputs, axis = _sizes_on_axes(inputs, channels, axis, rank, caller)
    if not _is_floating(inputs):
        if _dtype(inputs) != "bool" and "int" not in _dtype(inputs):
            raise TypeError(
                f"{caller}: expected a real-valued (float, integer or bool) "
                f"input tensor; received dtype {_dtype(inputs)}.")
        inputs = K.cast(inputs, compute_dtype)
    return inputs, axis


def _channels_on_axis(inputs, channels, axis, caller):
    message = (f"{caller} was built for {channels} channels on axis {axis}; "
               "received an input with")
    axis = channel_axis(_rank(inputs), axis, caller)
    received = inputs.shape[axis]
    if received is not None and received != channels:
        raise ValueError(
            f"{message} {received} channels (shape {tuple(inputs.shape)}).")
    if received is None:
        # Known only at run time (a traced [None, None] signature).
        inputs = backend.runtime_equal(
            inputs, K.shape(inputs)[axis], channels,
            f"{message} another number of channels.")
    return inputs, axis


def _sizes_on_axes(inputs, sizes, axis, rank, caller):
    """As `_channels_on_axis` for a list of axes, which fixes the rank."""
    shape = tuple(inputs.shape)
    if _rank(inputs) != rank:
        raise ValueError(
            f"{caller} was built for inputs of rank {rank} (axis={axis}); "
            f"received an input of rank {_rank(inputs)} (shape {shape}).")
    axes = channel_axis(rank, axis, caller)
    message = (f"{caller} was built for sizes {sizes} on axis={axis}; received "
               "an input with")
    received = tuple(shape[a] for a in axes)
    if any(r is not None and r != s for r, s in zip(received, sizes)):
        raise ValueError(f"{message} sizes {received} there (shape {shape}).")
    if None in received:
        dynamic = K.shape(inputs)
        inputs = backend.runtime_equal(
            inputs, K.stack([dynamic[a] for a in axes]), list(sizes),
            f"{message} other sizes there.")
    return inputs, axes


def vector(value, name, channels, dtype, caller, axis=None):
    """A (C,) parameter of the op as a `dtype` tensor, or None.

    For a list of axes (`axis`, as the user gave it), `channels` is the
    tuple of `x`'s sizes on them: the shape the parameter must have, as a
    multi-axis layer's weights do.
    """
    if value is None:
        return None
    value = _tensor(value, dtype)
    if not _is_floating(value):
        raise TypeError(
            f"{caller}: argument `{name}` must be floating-point; received "
            f"dtype {_dtype(value)}.")
    if isinstance(channels, tuple):
        if _rank(value) != len(channels) or not all(
                c is None or d is None or c == d for c, d in zip(channels, value.shape)):
            raise ValueError(
                f"{caller}: argument `{name}` must have shape {channels} to "
                f"match the sizes of `x` on axis={axis}; received shape "
                f"{tuple(value.shape)}.")
        return K.cast(value, dtype)
    if _rank(value) != 1 or (
            channels is not None and value.shape[0] is not None
            and value.shape[0] != channels):
        raise ValueError(
            f"{caller}: argument `{name}` must have shape ({channels},) to "
            f"match the {channels} channels of `x`; received shape "
            f"{tuple(value.shape)}.")
    return K.cast(value, dtype)


def mask(value, inputs, caller):
    """A mask with Keras's conventions, as a bool tensor of the input's rank.

    It must broadcast to the input, or do so once given back the last axis
    that Keras's masks lack (`Masking`, `Embedding(mask_zero=True)`),
    whatever the channel axis is.
    """
    value = K.convert_to_tensor(value)
    received = tuple(value.shape)
    rank = _rank(inputs)
    if _rank(value) == rank - 1:
        value = K.expand_dims(value, -1)
    if _rank(value) != rank or not all(
            m in (1, None) or d is None or m == d
            for m, d in zip(value.shape, inputs.shape)):
        raise ValueError(
            f"{caller}: argument `mask` must broadcast to the input's shape "
            f"{tuple(inputs.shape)}, or do so once given a last axis of size "
            f"1 (Keras's masks lack the last axis); received shape {received}.")
    return K.cast(value, "bool")


def batch_multiple(inputs, virtual_batch_size, caller):
    """The input, checked to split into ghost batches of the given size."""
    v = virtual_batch_size
    message = (f"{caller}: the batch size must be a multiple of "
               f"virtual_batch_size={v}; received")
    batch = inputs.shape[0]
    if batch is not None:
        if batch % v:
            raise ValueError(f"{message} a batch of {batch}.")
        return inputs
    return backend.runtime_equal(
        inputs, K.shape(inputs)[0] % v, 0, f"{message} another size.")
