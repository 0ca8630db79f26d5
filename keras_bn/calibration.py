"""Precise batch-norm statistics: recompute the moving averages after training.

The moving averages of a batch-norm layer mix statistics computed under
many past weights; after the last step they lag the weights they are used
with. `recalibrate` replaces them by the exact population statistics of the
current model over a set of batches (PreciseBN).
"""

import dataclasses
import itertools
import numbers

import keras
import numpy as np

from keras import ops as K

from keras_bn import ops
from keras_bn import private_api
from keras_bn.layer import BATCH_NORM_TYPES
from keras_bn.layer import BatchNorm


@dataclasses.dataclass(frozen=True)
class RecalibrationReport:
    """What `recalibrate` did.

    Attributes:
        layers: names of the batch-norm layers whose statistics were set.
        frozen: names of the batch-norm layers left alone because they are
            frozen (`trainable=False`, so they run in inference mode).
        batches: number of batches run through the model.
        examples: number of examples in those batches.
    """

    layers: tuple
    frozen: tuple
    batches: int
    examples: int

    def __str__(self):
        text = (
            f"recalibrated {len(self.layers)} batch-norm layers over "
            f"{self.batches} batches ({self.examples} examples)"
        )
        if self.frozen:
            text += f"; left {len(self.frozen)} frozen alone"
        return text


def _batch_norm_layers(model):
    """(to_update, frozen): the batch-norm layers in `model`, nested too."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "recalibrate: argument `model` must be a Keras model or layer; "
            f"received {type(model).__name__}."
        )
    layers = [layer for layer in private_api.all_layers(model)
              if isinstance(layer, BATCH_NORM_TYPES)]
    if not layers:
        raise ValueError(
            "recalibrate: argument `model` must contain a keras_bn.BatchNorm "
            "or keras.layers.BatchNormalization layer; received "
            f"{model.name!r}, which has none."
        )
    for layer in layers:
        if layer.moving_mean is None:
            raise ValueError(
                f"recalibrate: argument `model` must be built (call it on a "
                f"batch first); received {model.name!r}, whose layer "
                f"{layer.name!r} has no weights yet."
            )
    update = [layer for layer in layers if layer.trainable]
    frozen = [layer for layer in layers if not layer.trainable]
    if not update:
        raise ValueError(
            "recalibrate: argument `model` must have a trainable batch-norm "
            f"layer; received {model.name!r}, whose {len(frozen)} batch-norm "
            "layers are all frozen (trainable=False) and keep their "
            "statistics."
        )
    return update, frozen


def _check_data(data, steps):
    if steps is not None and (
        isinstance(steps, bool)
        or not isinstance(steps, numbers.Integral)
        or steps < 1
    ):
        raise ValueError(
            "recalibrate: argument `steps` must be None or an integer >= 1; "
            f"received steps={steps!r}."
        )
    if isinstance(data, np.ndarray) or K.is_tensor(data):
        raise ValueError(
            "recalibrate: argument `data` must yield batches (a "
            "tf.data.Dataset or an iterable of batches); received a single "
            f"array of shape {tuple(data.shape)}. Batch it first, e.g. "
            "tf.data.Dataset.from_tensor_slices(x).batch(64)."
        )
    if not hasattr(data, "__iter__"):
        raise ValueError(
            "recalibrate: argument `data` must be a tf.data.Dataset or an "
            f"iterable of batches; received {type(data).__name__}."
        )
    tf = _tensorflow()
    if tf is not None and isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY and steps is None:
            raise ValueError(
                "recalibrate: argument `steps` is required when `data` is an "
                "infinite dataset (e.g. one that repeats); received "
                "steps=None."
            )
        total = cardinality if cardinality >= 0 else None
    else:
        try:
            total = len(data)
        except TypeError:
            total = None
    if total is None:
        return steps
    return total if steps is None else min(steps, total)


def _batch_size(x):
    first = keras.tree.flatten(x)[0]
    size = first.shape[0] if len(first.shape) else None
    if size is None:
        raise ValueError(
            "recalibrate: every batch in argument `data` must have a batch "
            f"dimension; received an input of shape {tuple(first.shape)}."
        )
    return int(size)


class _BatchMoments:
    """One layer's per-batch statistics, merged into the population's at the
    end by `ops.merge_moments` (in float64, so nothing cancels)."""

    def __init__(self):
        self.sizes, self.means, self.variances = [], [], []

    def add(self, mean, variance, n):
        self.sizes.append(n)
        self.means.append(np.asarray(mean, np.float64))
        self.variances.append(np.asarray(variance, np.float64))

    @property
    def count(self):
        return sum(self.sizes)

    def result(self):
        # [batches, *weight shape]: a multi-axis layer's statistics are 2-D or more.
        counts = np.multiply.outer(self.sizes, np.ones_like(self.means[0]))
        _, mean, variance = ops.merge_moments(
            K.convert_to_tensor(counts), K.convert_to_tensor(np.stack(self.means)),
            K.convert_to_tensor(np.stack(self.variances)))
        return K.convert_to_numpy(mean), K.convert_to_numpy(variance)


def _refused(layer):
    """How many batches the layer's bad-batch guard has refused so far."""
    return layer.refused_batches if isinstance(layer, BatchNorm) else None


def _positions(layer):
    """Values per example and channel the layer sees (1 for Dense outputs),
    from its input shape where Keras recorded one."""
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):
        return 1
    kept = {0, *(a % len(shape) for a in np.atleast_1d(layer.axis))}
    sizes = [d for i, d in enumerate(shape) if i not in kept]
    return int(np.prod(sizes)) if all(d is not None for d in sizes) else 1


def _statistics(layer):
    return (layer.moving_mean, layer.moving_variance)


def _restore(saved):
    for variable, value in saved:
        variable.assign(value)


def recalibrate(model, data, steps=None, verbose=1):
    """Sets every batch-norm layer's moving statistics to the exact ones.

    PreciseBN (Wu & Johnson, 2021): the moving averages kept during training
    lag the weights, so after training this runs `model` over `data` with
    batch statistics and sets each layer's `moving_mean` and
    `moving_variance` to the statistics of all the batches seen:

    - mean: the mean of the batch means, weighted by batch size;
    - variance: the pooled variance, the weighted mean of
      `var + mean**2` minus the population `mean**2`: biased, as the
      layers store it, or times N / (N - 1) for a `BatchNorm` with
      `unbiased_moving_variance=True`, N the number of values per channel
      (examples times positions, from the layer's recorded input shape).

    A `BatchNorm` with `momentum=None` also gets `num_batches_tracked` set
    to the number of batches averaged. Batches its bad-batch guard refuses
    (non-finite statistics) don't count for that layer.

    This applies to `keras_bn.BatchNorm` and `keras.layers.BatchNormalization`
    layers anywhere in `model`, nested models and layers included. A partial
    last batch counts with its real size. If batches differ in spatial size
    (images of several resolutions), each example weighs the same, whatever
    its number of positions.

    The model runs in training mode, as in the paper's implementation
    (fvcore's `update_bn_stats`), so Dropout and other training-only layers
    are active and the statistics are those the layers see in training.
    Nothing else changes: trainable weights and the optimizer are not
    touched, every other non-trainable variable (random-seed state
    included) is restored, and so is each layer's momentum, even if an
    error interrupts the run (the moving statistics are then restored
    too). Frozen layers (`trainable=False`) run in inference mode and keep
    their statistics.

    A layer called more than once per forward pass (shared between two
    branches) keeps the statistics of its last call only. With
    `keras.layers.BatchNormalization` and a mask, each batch is weighted
    by its number of examples, not of unmasked positions.

    Args:
        model: A built Keras model (or layer) containing batch-norm layers.
        data: A `tf.data.Dataset` or another iterable of batches. Each batch
            is `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`, as in
            `fit()`; only `x` is used. A model with several inputs takes
            `x` as a tuple or dict inside the batch: `((x1, x2), y)`.
        steps: The number of batches to use; None (the default) uses all of
            `data`, which must then be finite.
        verbose: 0 for silence, 1 for a progress bar, 2 for one line at the
            end (`keras.utils.Progbar`).

    Returns:
        A `RecalibrationReport` with the names of the layers updated and
        left frozen, and the numbers of batches and examples seen.

    Reference:
        - [Wu and Johnson, 2021](https://arxiv.org/abs/2105.07576),
          section 3 ("Precise BatchNorm").
    """
    layers, frozen = _batch_norm_layers(model)
    target = _check_data(data, steps)
    saved = [(v, v.numpy()) for v in model.non_trainable_variables]
    saved += [(layer._refused_batches, layer._refused_batches.numpy())
              for layer in layers if isinstance(layer, BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    unbiased = [getattr(layer, "unbiased_moving_variance", False) for layer in layers]
    pooled = [_BatchMoments() for _ in layers]
    batches = 0
    progbar = keras.utils.Progbar(target, verbose=verbose, unit_name="batch")
    try:
        # With momentum 0 the layers' own update writes the batch statistics
        # into the moving ones exactly (0 * old + 1 * batch), whatever the
        # layer type or kernel, so no hook into the model is needed. Keras
        # reads `momentum` when a function is traced: hence a fresh
        # tf.function, traced after the change.
        for layer in layers:
            layer.momentum = 0.0
            if isinstance(layer, BatchNorm):
                layer.unbiased_moving_variance = False
        forward = _compiled(lambda x: model(x, training=True))
        for batch in itertools.islice(data, steps):
            x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
            x = keras.tree.map_structure(K.convert_to_tensor, x)
            n = _batch_size(x)
            if n == 0:
                continue  # no statistics to add, and NaN ones to avoid
            refused = [_refused(layer) for layer in layers]
            forward(x)
            for layer, moments, before in zip(layers, pooled, refused):
                # A batch the bad-batch guard refused left the previous
                # statistics in place: they must not count twice.
                if _refused(layer) != before:
                    continue
                moments.add(
                    layer.moving_mean.numpy(), layer.moving_variance.numpy(), n
                )
            batches += 1
            progbar.update(batches, finalize=False)
        if batches == 0:
            raise ValueError(
                "recalibrate: argument `data` must yield at least one batch; "
                "received an empty one."
            )
    except BaseException:
        _restore(saved)
        raise
    finally:
        for layer, momentum, flag in zip(layers, momenta, unbiased):
            layer.momentum = momentum
            if isinstance(layer, BatchNorm):
                layer.unbiased_moving_variance = flag
    # Every other non-trainable variable (random-seed state, the statistics
    # of frozen layers, ...) goes back to what it was.
    ours = {id(v) for layer in layers for v in _statistics(layer)}
    _restore([(v, value) for v, value in saved if id(v) not in ours])
    for layer, moments, flag in zip(layers, pooled, unbiased):
        if moments.count == 0:
            continue  # every batch refused: the layer keeps its statistics
        mean, variance = moments.result()
        if flag:
            values = moments.count * _positions(layer)
            if values < 2:
                continue  # no unbiased variance of one value: the guard's rule
            variance = ops.unbiased_variance(variance, values)
        if getattr(layer, "momentum", 0.0) is None:
            # A cumulative average over the batches just seen.
            layer.num_batches_tracked.assign(len(moments.sizes))
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(
            variance.astype(layer.moving_variance.dtype)
        )
        # Renorm layers (ours and Keras's) infer with the moving stddev and
        # derive the variance from it: both must say the same.
        if getattr(layer, "renorm", False):
            stddev = K.convert_to_numpy(ops.stddev_of(variance=variance, epsilon=layer.epsilon))
            layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))
    progbar.update(batches, finalize=True)
    return RecalibrationReport(
        layers=tuple(layer.name for layer in layers),
        frozen=tuple(layer.name for layer in frozen),
        batches=batches,
        examples=pooled[0].count,
    )


def _tensorflow():
    """TensorFlow where it is imported (its tf.data is one kind of `data`),
    else None: the JAX and PyTorch backends don't need it installed."""
    import sys

    return sys.modules.get("tensorflow")


def _compiled(forward):
    """The training-mode forward pass, traced once per input signature on
    TensorFlow (tf.function); called as it is elsewhere, where the moving
    statistics are plain variable updates."""
    tf = _tensorflow()
    if keras.config.backend() == "tensorflow" and tf is not None:
        return tf.function(forward, reduce_retracing=True)
    return forward
