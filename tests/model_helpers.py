"""Small models whose batch norms look trained, shared by the export, saving,
TFLite and folding tests."""

import inspect

import keras
import numpy as np
import pytest

from keras_bn import BatchNorm
from tests.reference import random_params

BATCH_NORMS = (BatchNorm, keras.layers.BatchNormalization)

# keras.layers.BatchNormalization has renorm from Keras 3.14; the supported
# floor (setup.cfg) is older, so tests that compare with Keras's renorm skip.
KERAS_RENORM = "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters
needs_keras_renorm = pytest.mark.skipif(
    not KERAS_RENORM, reason=f"Keras {keras.__version__}'s BatchNormalization has no renorm")


def all_layers(model):
    """Every layer of `model`, nested models' layers included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def randomize_batch_norms(model, seed=0):
    """Gives every batch norm in `model` its own `random_params`.

    Freshly built batch norms are the identity in inference (mean 0,
    variance 1, gamma 1, beta 0); with these values a test notices a
    statistic that is dropped, swapped or taken from the batch instead.
    """
    for i, layer in enumerate(all_layers(model)):
        if isinstance(layer, BATCH_NORMS):
            gamma, beta, mean, var = random_params(
                layer.moving_mean.shape[0], seed + i
            )
            weights = ([gamma] if layer.scale else []) + (
                [beta] if layer.center else []
            )
            layer.set_weights(
                [w.astype(np.float32) for w in weights + [mean, var]]
            )
    return model


def serving_cnn(name="cnn"):
    """A small image classifier: one batch norm after a convolution, one
    after pooling (nothing to fold into), one after a Dense layer."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = BatchNorm(name="bn_conv")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = BatchNorm(name="bn_pool")(x)
    x = keras.layers.Dense(6, use_bias=False)(x)
    x = BatchNorm(name="bn_dense")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    return randomize_batch_norms(keras.Model(inputs, outputs, name=name))


def images(n, seed=0):
    return np.random.RandomState(seed).normal(0.5, 1.0, (n, 8, 8, 3)).astype(
        np.float32
    )
