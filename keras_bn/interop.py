"""PyTorch interop: `torch.nn.BatchNorm*d` state dicts to and from `BatchNorm`.

Reading needs no PyTorch: a state dict of NumPy arrays works as well as one
of torch tensors. The conventions that differ:

- momentum: PyTorch's weighs the *new* batch, ours the old average, so
  torch `m` is our `1 - m` (0.1 <-> 0.9, both defaults);
- running variance: PyTorch stores the unbiased (n / (n - 1)) batch
  variance, `BatchNorm` the biased one unless `unbiased_moving_variance=True`;
  both normalize with the biased one in training, so only the stored
  statistics differ. `from_torch` turns the unbiased option on, so that
  training goes on exactly as it would have in PyTorch;
- momentum None (a cumulative average) is `BatchNorm(momentum=None)`;
  `num_batches_tracked` is carried both ways for every momentum (the layer
  keeps it with `track_num_batches=True`);
- `track_running_stats=False` (batch statistics in training and in eval
  mode, nothing stored) is `BatchNorm(track_running_stats=False)`;
- a weight without a bias (or a bias without a weight) is `scale` without
  `center` (or the reverse).
"""

import collections.abc

import numpy as np

from keras_bn import checks
from keras_bn.layer import BATCH_NORM_TYPES
from keras_bn.layer import BatchNorm

_KEYS = (
    "weight", "bias", "running_mean", "running_var", "num_batches_tracked"
)


def _to_numpy(value):
    """A torch tensor (without importing torch), array or list to NumPy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        # NumPy has no bfloat16; float32 holds every bfloat16 value.
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _split_prefix(state_dict):
    """{"bn1.weight": w, ...} -> ("bn1.", {"weight": w, ...})."""
    entries = {}
    prefixes = set()
    for key, value in state_dict.items():
        prefix, _, name = str(key).rpartition(".")
        prefixes.add(prefix + "." if prefix else "")
        entries[name] = value
    if len(prefixes) > 1:
        prefixes = sorted(prefixes)
        raise ValueError(
            "from_torch: argument `state_dict_or_module` must hold one "
            "batch-norm layer's entries; received keys with the prefixes "
            f"{', '.join(repr(p) for p in prefixes)}. Select one layer, e.g. "
            "{k: v for k, v in state_dict.items() if "
            f"k.startswith({prefixes[0]!r})}}."
        )
    unexpected = sorted(set(entries) - set(_KEYS))
    if unexpected:
        raise ValueError(
            "from_torch: argument `state_dict_or_module` must hold the "
            f"entries {', '.join(_KEYS)} of a batch-norm layer; received the "
            f"unexpected entries {', '.join(unexpected)}."
        )
    return prefixes.pop() if prefixes else "", entries


def _module_settings(module, layer_kwargs):
    """BatchNorm's momentum and epsilon from a torch module's, unless given."""
    settings = {}
    if not getattr(module, "track_running_stats", True):
        settings["track_running_stats"] = False
    if "momentum" not in layer_kwargs:
        torch_momentum = getattr(module, "momentum", 0.1)
        settings["momentum"] = (
            None if torch_momentum is None else 1.0 - float(torch_momentum))
    if "epsilon" not in layer_kwargs:
        settings["epsilon"] = float(getattr(module, "eps", 1e-5))
    return settings


def from_torch(state_dict_or_module, axis=1, **layer_kwargs):
    """A built `BatchNorm` holding a PyTorch batch-norm layer's state.

    Its inference outputs equal the module's eval-mode outputs. A state dict
    doesn't say which of `BatchNorm1d/2d/3d` it came from, and the layer
    doesn't need to: it accepts inputs of any rank >= 2 with the module's C
    channels on `axis`.

    Args:
        state_dict_or_module: A `torch.nn.BatchNorm1d/2d/3d` module (or any
            object with `state_dict()` and the attributes `momentum` and
            `eps`), or a mapping from names to torch tensors or NumPy arrays:
            `weight`, `bias` (both absent for `affine=False`),
            `running_mean`, `running_var` and optionally
            `num_batches_tracked`. The names may carry a common prefix, as
            in a model's state dict (`"bn1.weight"`).
        axis: The channel axis, 1 as in PyTorch's channels-first layouts;
            -1 for channels-last inputs.
        **layer_kwargs: More `BatchNorm` arguments (`name`, `dtype`, ...).
            A module's momentum and eps become `momentum=1 - momentum` (None
            stays None: a cumulative average) and `epsilon=eps`; passed here
            (in BatchNorm's convention) they override those. A plain state
            dict has neither, and the defaults (0.9 and 1e-5) are PyTorch's.
            `unbiased_moving_variance` defaults to True here, PyTorch's way
            of keeping the running variance.

    Returns:
        A built `BatchNorm`: `scale` where there is a weight, `center` where
        there is a bias; `num_batches_tracked` in its weight of that name
        whenever the state dict has one (`track_num_batches=True`); and
        `track_running_stats=False`, with no moving statistics, for a module
        built so (or a state dict with neither running statistic).

    Raises:
        ValueError: for entries that are unexpected, of different lengths,
            or only one of the two running statistics, or a list of several
            axes.
    """
    axis = checks.axis(axis, "from_torch")
    if not isinstance(axis, int):
        raise ValueError(
            "from_torch: argument `axis` must be a single integer, as a PyTorch "
            f"batch norm has one channel axis; received axis={axis}.")
    settings = {}
    if hasattr(state_dict_or_module, "state_dict") and not isinstance(
        state_dict_or_module, collections.abc.Mapping
    ):
        settings = _module_settings(state_dict_or_module, layer_kwargs)
        state_dict = state_dict_or_module.state_dict()
    elif isinstance(state_dict_or_module, collections.abc.Mapping):
        state_dict = state_dict_or_module
    else:
        raise TypeError(
            "from_torch: argument `state_dict_or_module` must be a torch "
            "batch-norm module or a mapping of names to tensors; received "
            f"{type(state_dict_or_module).__name__}."
        )
    prefix, entries = _split_prefix(state_dict)
    running = [k for k in ("running_mean", "running_var") if k in entries]
    if len(running) == 1:
        raise ValueError(
            "from_torch: argument `state_dict_or_module` must have both "
            f"{prefix}running_mean and {prefix}running_var, or neither "
            f"(track_running_stats=False); received {prefix}{running[0]} "
            "alone."
        )
    tracking = bool(running) and settings.get("track_running_stats", True)
    names = tuple(k for k in ("weight", "bias") if k in entries)
    names += ("running_mean", "running_var") if tracking else ()
    if not names:
        raise ValueError(
            "from_torch: argument `state_dict_or_module` must hold a "
            "batch-norm layer's entries (weight, bias, running_mean, "
            f"running_var); received {', '.join(prefix + k for k in entries) or 'no entries'}."
        )
    arrays = [_to_numpy(entries[name]) for name in names]
    channels = arrays[-1].shape
    for name, array in zip(names, arrays):
        if array.ndim != 1 or array.shape != arrays[-1].shape:
            raise ValueError(
                "from_torch: argument `state_dict_or_module` must have "
                f"entries of one shape (C,); received {prefix}{name} of "
                f"shape {array.shape} and {prefix}{names[-1]} of shape "
                f"{channels}."
            )
    if "num_batches_tracked" in entries:
        tracked = _to_numpy(entries["num_batches_tracked"])
        if tracked.size != 1:
            raise ValueError(
                "from_torch: argument `state_dict_or_module` must have a "
                f"scalar {prefix}num_batches_tracked; received shape "
                f"{tracked.shape}."
            )
    layer_kwargs = {**settings, **layer_kwargs}
    layer_kwargs.setdefault("unbiased_moving_variance", True)
    layer_kwargs.setdefault("center", "bias" in entries)
    layer_kwargs.setdefault("scale", "weight" in entries)
    layer_kwargs.setdefault("track_running_stats", tracking)
    layer_kwargs.setdefault("track_num_batches", "num_batches_tracked" in entries)
    layer = BatchNorm(axis=axis, **layer_kwargs)
    # Any rank with `axis` in range: only the channel count is kept.
    rank = max(2, axis + 1 if axis >= 0 else -axis)
    shape = [None] * rank
    shape[axis] = channels[0]
    layer.build(tuple(shape))
    values = dict(zip(names, arrays))
    weights = []
    if layer.scale:
        weights.append(values.get("weight", np.ones(channels)))
    if layer.center:
        weights.append(values.get("bias", np.zeros(channels)))
    if layer.track_running_stats:
        weights += [values["running_mean"], values["running_var"]]
    if hasattr(layer, "num_batches_tracked"):
        tracked = entries.get("num_batches_tracked", 0)
        weights.append(np.asarray(_to_numpy(tracked)).reshape(()))
    layer.set_weights(
        [w.astype(v.dtype) for w, v in zip(weights, layer.weights)]
    )
    return layer


def to_torch_state_dict(layer, num_batches_tracked=None, as_numpy=False):
    """The state dict of a `torch.nn.BatchNorm*d` equivalent to `layer`.

    Load it into `torch.nn.BatchNorm2d(C, eps=layer.epsilon,
    momentum=1 - layer.momentum)` (or 1d/3d, as the data's rank requires)
    with `load_state_dict`; its eval-mode outputs then equal the layer's
    inference outputs. A layer with neither `center` nor `scale` maps to
    `affine=False` (no weight, no bias); one with only one of them writes
    the missing one as ones (weight) or zeros (bias), which changes nothing.
    `running_var` is the layer's moving variance: the unbiased estimate
    PyTorch keeps if the layer has `unbiased_moving_variance=True` (as
    `from_torch` layers do), else the biased one.

    Args:
        layer: A built `keras_bn.BatchNorm` or
            `keras.layers.BatchNormalization`.
        num_batches_tracked: The step count to write. None (the default)
            takes the layer's own count when it has one (momentum=None or
            track_num_batches=True, as `from_torch` layers have), else 0;
            PyTorch uses it only when momentum is None.
        as_numpy: If True, NumPy arrays (and no torch import); else torch
            tensors, which `load_state_dict` requires.

    Raises:
        ValueError: for a layer with a list of several axes, which no
            PyTorch batch norm has.

    Returns:
        A dict with the keys `weight`, `bias` (unless affine=False),
        `running_mean`, `running_var` and `num_batches_tracked`; only the
        first two for a layer with `track_running_stats=False`, for a
        module built with that option.
    """
    if not isinstance(layer, BATCH_NORM_TYPES):
        raise TypeError(
            "to_torch_state_dict: argument `layer` must be a "
            "keras_bn.BatchNorm or keras.layers.BatchNormalization; "
            f"received {type(layer).__name__}."
        )
    if not layer.built:
        raise ValueError(
            "to_torch_state_dict: argument `layer` must be built; received "
            f"{layer.name!r}, which has no weights yet."
        )
    if not isinstance(layer.axis, int):
        raise ValueError(
            "to_torch_state_dict: argument `layer` must have a single channel "
            "axis, as a PyTorch batch norm has; received "
            f"{layer.name!r} with axis={layer.axis}."
        )
    state = {}
    if layer.scale or layer.center:
        ones = np.ones(layer.weights[0].shape, np.float32)  # gamma or beta: (C,)
        state["weight"] = layer.gamma.numpy() if layer.scale else ones
        state["bias"] = layer.beta.numpy() if layer.center else 0.0 * ones
    if not getattr(layer, "track_running_stats", True):
        return _as_torch(state, as_numpy)
    state["running_mean"] = layer.moving_mean.numpy()
    state["running_var"] = layer.moving_variance.numpy()
    if num_batches_tracked is None:
        counter = getattr(layer, "num_batches_tracked", None)
        num_batches_tracked = 0 if counter is None else counter.numpy()
    state["num_batches_tracked"] = np.array(num_batches_tracked, np.int64)
    return _as_torch(state, as_numpy)


def _as_torch(state, as_numpy):
    if as_numpy:
        return state
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "to_torch_state_dict: torch tensors need PyTorch, which is not "
            "installed; pass as_numpy=True for NumPy arrays."
        ) from error
    return {key: torch.from_numpy(np.copy(v)) for key, v in state.items()}
