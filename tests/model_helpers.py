"""Small models whose batch norms look trained, shared by the export, saving,
TFLite and folding tests, and a SavedModel server without keras_bn."""

import inspect
import os
import subprocess
import sys

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


# Run in a fresh interpreter that cannot import keras_bn: a meta-path
# finder ahead of all others refuses it, however it is installed.
_SERVE_WITHOUT_KERAS_BN = r"""
import importlib.abc
import sys


class _BlockKerasBn(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "keras_bn" or name.startswith("keras_bn."):
            raise ImportError(f"{name} is blocked in this process")
        return None


sys.meta_path.insert(0, _BlockKerasBn())
import numpy as np
import tensorflow as tf

inputs_path, outputs_path, *directories = sys.argv[1:]
inputs = np.load(inputs_path)
outputs = {}
for i, directory in enumerate(directories):
    loaded = tf.saved_model.load(directory)
    serve = loaded.signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    for key in inputs.files:
        (y,) = serve(**{name: tf.constant(inputs[key])}).values()
        outputs[f"{i}_{key}"] = y.numpy()
try:
    import keras_bn  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("keras_bn was importable")
assert "keras_bn" not in sys.modules, sorted(sys.modules)
np.savez(outputs_path, **outputs)
print("served without keras_bn")
"""


def serve_without_keras_bn(tmp_path, directories, inputs):
    """Each SavedModel's `serving_default` on each of `inputs` (name ->
    array), served by a fresh interpreter that cannot import keras_bn: per
    directory, a dict name -> output."""
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = subprocess.run(
        [sys.executable, "-c", _SERVE_WITHOUT_KERAS_BN,
         str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz"), *directories],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "served without keras_bn" in result.stdout
    outputs = np.load(tmp_path / "outputs.npz")
    return [{key: outputs[f"{i}_{key}"] for key in inputs} for i in range(len(directories))]
