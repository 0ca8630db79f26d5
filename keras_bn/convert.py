"""Whole-model conversion between `keras.layers.BatchNormalization` and
`keras_bn.BatchNorm`.

Both functions copy a Sequential or functional model with
`keras.models.clone_model`, swap the batch-norm layers on the way, and then
copy every layer's weights from the source, which `clone_model` alone would
leave freshly initialized. With the same arguments the two layers compute
the same function, and their weights have the same names (gamma, beta,
moving_mean, moving_variance, and renorm's moving_stddev, renorm_mean,
renorm_stddev), which carry a batch norm's state across.
"""

import inspect

import keras

from keras_bn import checks
from keras_bn import private_api
from keras_bn.layer import BatchNorm

# Arguments both layers take, with one meaning, stored under one attribute.
# keras_bn's defaults differ (momentum 0.9, epsilon 1e-5 against Keras's
# 0.99 and 1e-3), so every one of them is copied, never left to a default.
_SHARED_ARGUMENTS = (
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
    "synchronized",
    "renorm",
    "renorm_momentum",
)
_OVERRIDABLE = tuple(
    name
    for name, parameter in inspect.signature(BatchNorm.__init__).parameters.items()
    if name != "self" and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
)


# keras.layers.BatchNormalization has renorm from Keras 3.14 on; before,
# its layers are renorm=False ones and take no renorm arguments.
_KERAS_RENORM = "renorm" in inspect.signature(
    keras.layers.BatchNormalization.__init__).parameters
_RENORM_ARGUMENTS = ("renorm", "renorm_momentum", "renorm_clipping")


def _layer_arguments(layer):
    """The arguments shared by both batch norms, read from either."""
    arguments = {name: getattr(layer, name) for name in _SHARED_ARGUMENTS
                 if name not in _RENORM_ARGUMENTS}
    renorm = getattr(layer, "renorm", False)
    arguments["renorm"] = renorm
    arguments["renorm_momentum"] = getattr(layer, "renorm_momentum", 0.99)
    # Keras keeps whatever clipping it was given while renorm is off;
    # BatchNorm refuses clipping without renorm.
    arguments["renorm_clipping"] = (
        dict(layer.renorm_clipping or {}) if renorm else None
    )
    arguments.update(
        name=layer.name, trainable=layer.trainable, dtype=layer.dtype_policy
    )
    return arguments


def _new_inputs(model):
    """Fresh inputs like a functional model's, under their layers' names.

    `clone_model` would name them after the symbolic tensors
    ("keras_tensor_5"), losing the input names a serving signature shows.
    """
    layers = {
        id(layer.output): layer
        for layer in model.layers
        if isinstance(layer, keras.layers.InputLayer)
    }
    return keras.tree.map_structure(
        lambda x: type(layers[id(x)]).from_config(
            layers[id(x)].get_config()).output,
        model.input,
    )


class _Converter:
    """Clones a model with `convert(layer)` in place of each layer it
    converts, then gives every clone its source's weights."""

    def __init__(self, caller, convert, check=None):
        self.caller = caller
        self.convert = convert  # layer -> new layer, or None to copy it
        self.check = check  # (model) -> None, raises on what can't convert
        self.clones = {}  # id(source) -> clone; a shared layer stays shared
        self.pairs = []  # (source, clone) in the order the clones were made

    def clone(self, layer):
        if id(layer) in self.clones:
            return self.clones[id(layer)]
        if isinstance(layer, keras.Model):
            # By hand rather than clone_model(recursive=True): the nested
            # model's layers then share this converter's memo and pairs.
            clone = self.clone_model(layer)
        else:
            clone = self.convert(layer)
            if clone is None:
                clone = type(layer).from_config(layer.get_config())
        self.clones[id(layer)] = clone
        self.pairs.append((layer, clone))
        return clone

    def clone_model(self, model):
        checks.graph_model(model, self.caller)
        if self.check is not None:
            self.check(model)
        if isinstance(model, keras.Sequential):
            return keras.models.clone_model(model, clone_function=self.clone)
        return keras.models.clone_model(
            model, input_tensors=_new_inputs(model), clone_function=self.clone
        )

    def __call__(self, model):
        converted = self.clone_model(model)
        # Plain operations in the graph (`x + y` on symbolic tensors) have
        # neither weights nor a trainable flag.
        pairs = [(model, converted)] + [
            pair for pair in self.pairs[::-1]
            if isinstance(pair[0], keras.layers.Layer)
        ]
        # Setting a model's `trainable` sets all its layers', so models go
        # first (outer before inner) and each layer's own flag after.
        pairs.sort(key=lambda pair: not isinstance(pair[0], keras.Model))
        for source, clone in pairs:
            if clone.trainable != source.trainable:
                clone.trainable = source.trainable
        for source, clone in pairs:
            if not isinstance(source, keras.Model) and source.built:
                clone.set_weights(_weights_for(clone, source))
        return converted


def _weights_for(clone, source):
    """`source`'s weights in the order of `clone`'s.

    A copy takes them as they are. Across the two batch-norm classes they
    go by name: the shared ones (gamma, beta, the moving statistics,
    renorm's) have the same names, and a weight only BatchNorm keeps
    (`num_batches_tracked`, `renorm_steps`) is dropped, or keeps its initial
    value in the other direction.
    """
    if type(clone) is type(source):
        return source.get_weights()
    values = {v.name: v.numpy() for v in source.weights}
    return [values.get(v.name, v.numpy()) for v in clone.weights]


def from_keras(model, **overrides):
    """A copy of `model` with each Keras batch norm a `keras_bn.BatchNorm`.

    Every `keras.layers.BatchNormalization` (the class itself; a subclass
    may compute something else and is copied as it is) becomes a
    `keras_bn.BatchNorm` with all of its arguments: axis, momentum,
    epsilon, center, scale, initializers, regularizers, constraints,
    synchronized, renorm, renorm_clipping, renorm_momentum, name,
    trainable and dtype policy. keras_bn's own defaults (momentum 0.9,
    epsilon 1e-5) never apply. Its weights (gamma, beta, the moving
    statistics and renorm's) are copied, so the copy computes what `model`
    computes, in training and in inference, within float rounding.

    Every other layer is a copy with the same config and weights, nested
    Sequential and functional models are converted in turn, a layer shared
    between places stays shared, and the copy is compiled as `model` was (a
    fresh optimizer state). `model` is left untouched and shares no
    variable with the copy.

    Args:
        model: A `keras.Sequential` or functional `keras.Model`.
        **overrides: `keras_bn.BatchNorm` arguments to set on every
            converted layer instead of the copied value, e.g.
            `synchronized=True` or `fused=False`.

    Returns:
        A new `keras.Model` of the same kind.

    Raises:
        TypeError: for an override that is no BatchNorm argument, or a
            `model` that is no Keras model.
        ValueError: for a subclassed model, at the top or nested, whose
            layer graph is unknown.
    """
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(
            f"from_keras: unknown override {', '.join(map(repr, unknown))}; "
            f"expected keras_bn.BatchNorm arguments among "
            f"{', '.join(_OVERRIDABLE)}; received "
            f"{', '.join(f'{k}={overrides[k]!r}' for k in sorted(overrides))}."
        )

    def convert(layer):
        # The class itself, not layer.BATCH_NORM_TYPES: a subclass may
        # compute something else, and a BatchNorm is converted already.
        if type(layer) is not keras.layers.BatchNormalization:
            return None
        return BatchNorm(**{**_layer_arguments(layer), **overrides})

    return _Converter("from_keras", convert)(model)


def _unsupported(layer, argument, expected, received):
    return ValueError(
        f"to_keras: BatchNorm '{layer.name}' has no keras.layers."
        f"BatchNormalization equivalent: argument `{argument}` must be "
        f"{expected} there; received {argument}={received!r}."
    )


def _check_options(layer):
    """Raises ValueError for a BatchNorm option Keras's layer can't express."""
    if not isinstance(layer.axis, int):
        raise _unsupported(
            layer, "axis", "a single integer (Keras keeps statistics along one "
            "channel axis)", layer.axis)
    if layer.momentum is None:
        raise _unsupported(
            layer, "momentum", "a number (Keras keeps no cumulative average)",
            None)
    if layer.virtual_batch_size is not None:
        raise _unsupported(
            layer, "virtual_batch_size",
            "None (Keras has no ghost batch normalization)",
            layer.virtual_batch_size)
    if not layer.track_running_stats:
        raise _unsupported(
            layer, "track_running_stats",
            "True (Keras's layer infers with its moving statistics)", False)
    if layer.unbiased_moving_variance:
        raise _unsupported(
            layer, "unbiased_moving_variance",
            "False (Keras's moving variance follows the biased batch "
            "variance)", True)
    if layer.adjustment is not None:
        raise _unsupported(
            layer, "adjustment", "None (Keras 3's layer has no adjustment)",
            layer.adjustment)
    if any(callable(bound) for bound in layer.renorm_clipping.values()):
        raise _unsupported(
            layer, "renorm_clipping",
            "a dict of numbers (Keras takes no schedule or callable bound)",
            layer.renorm_clipping)


def _check_calls(model):
    """Raises ValueError for a BatchNorm called on inputs of two ranks:
    Keras's layer fixes the input rank at build time."""
    ranks = {}
    for node in private_api.call_nodes(model) if model.built else ():
        layer = node.operation
        if type(layer) is not BatchNorm:
            continue
        ranks.setdefault(id(layer), set()).add(len(node.input_tensors[0].shape))
        if len(ranks[id(layer)]) > 1:
            raise ValueError(
                f"to_keras: BatchNorm '{layer.name}' has no keras.layers."
                "BatchNormalization equivalent: Keras's layer takes inputs "
                "of the one rank it was built for; received calls on inputs "
                f"of ranks {sorted(ranks[id(layer)])} in model "
                f"'{model.name}'."
            )


def to_keras(model):
    """A copy of `model` with each `keras_bn.BatchNorm` a Keras batch norm.

    For sharing a model with people who don't have keras_bn: every
    `keras_bn.BatchNorm` becomes a `keras.layers.BatchNormalization` with
    its arguments (axis, momentum, epsilon, center, scale, initializers,
    regularizers, constraints, synchronized, renorm, renorm_clipping,
    renorm_momentum, name, trainable, dtype policy) and its weights; the
    copy computes what `model` computes within float rounding. Options that
    leave that function unchanged are dropped: `fused` (a choice of kernel),
    `track_num_batches` (a step count, with its `num_batches_tracked`
    weight) and `guard_bad_batches` (Keras's layer writes the NaN or Inf of
    a bad training batch into its moving statistics where BatchNorm's
    guard keeps them). Under the float16/bfloat16 policies (not the mixed
    ones) Keras keeps the weights in half precision, where BatchNorm keeps
    float32; they are rounded on the way.

    Every other layer is a copy with the same config and weights, nested
    Sequential and functional models are converted in turn, and the copy is
    compiled as `model` was (a fresh optimizer state). `model` is left
    untouched.

    Args:
        model: A `keras.Sequential` or functional `keras.Model`.

    Returns:
        A new `keras.Model` of the same kind.

    Raises:
        ValueError: naming the layer and the option, for a BatchNorm Keras's
            layer can't express: a list of several axes, `momentum=None`
            (a cumulative average),
            `virtual_batch_size`, `track_running_stats=False`,
            `unbiased_moving_variance=True`, an `adjustment`, a callable or
            schedule among the `renorm_clipping` bounds, or calls on inputs
            of different ranks; and for any other keras_bn layer
            (`ChannelAffine`), which Keras has no layer for.
    """

    def convert(layer):
        # Exactly BatchNorm, as from_keras takes exactly Keras's class: a
        # subclass may compute something Keras's layer doesn't.
        if type(layer) is BatchNorm:
            _check_options(layer)
            arguments = _layer_arguments(layer)
            if not _KERAS_RENORM:
                if arguments["renorm"]:
                    raise _unsupported(
                        layer, "renorm", "False (keras.layers.BatchNormalization "
                        f"has renorm from Keras 3.14; this is {keras.__version__})",
                        True)
                for name in _RENORM_ARGUMENTS:
                    del arguments[name]
            return keras.layers.BatchNormalization(**arguments)
        if type(layer).__module__.split(".")[0] == "keras_bn":
            raise ValueError(
                f"to_keras: argument `model` must hold no keras_bn layer but "
                f"BatchNorm, which Keras has no layer for; received layer "
                f"'{layer.name}' of type keras_bn.{type(layer).__name__}."
            )
        return None

    return _Converter("to_keras", convert, check=_check_calls)(model)
