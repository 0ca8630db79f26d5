"""TFLite: the SavedModel converts, the interpreter matches `predict`, and a
batch norm costs at most a multiply and an add in the converted graph."""

import collections
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from tests.model_helpers import images
from tests.model_helpers import randomize_batch_norms
from tests.model_helpers import serving_cnn

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # TensorFlow's own, deprecated but shipped with 2.21
    Interpreter = getattr(tf.lite, "Interpreter", None)

pytestmark = pytest.mark.skipif(
    Interpreter is None, reason="needs ai-edge-litert or tf.lite.Interpreter")

# The interpreter's kernels (XNNPACK) sum in another order, and the batch
# norm next to the convolution is folded into its weights: a few float32
# ulps of the O(1-10) logits and of the convolution's sums.
TFLITE_TOL = 1e-4


def _interpreter(flatbuffer):
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"\s*Warning: tf\.lite\.Interpreter is deprecated", UserWarning)
        return Interpreter(model_content=flatbuffer)


def _convert_saved_model(model, directory):
    model.export(str(directory), verbose=False)
    return tf.lite.TFLiteConverter.from_saved_model(str(directory)).convert()


def _op_counts(flatbuffer):
    # The op list has no public accessor on either interpreter.
    return collections.Counter(
        op["op_name"] for op in _interpreter(flatbuffer)._get_ops_details())


def _extra_ops(model, baseline, tmp_path):
    """Ops `model` converts to beyond those of `baseline`, and those missing."""
    ops = _op_counts(_convert_saved_model(model, tmp_path / "model"))
    base = _op_counts(_convert_saved_model(baseline, tmp_path / "baseline"))
    return ops - base, base - ops


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = serving_cnn()
    return model, _convert_saved_model(model, tmp_path_factory.mktemp("tflite"))


def test_interpreter_matches_predict(converted):
    model, flatbuffer = converted
    runner = _interpreter(flatbuffer).get_signature_runner("serving_default")
    for n in (1, 5):
        x = images(n, seed=n)
        (y,) = runner(image=x).values()
        np.testing.assert_allclose(y, model.predict(x, verbose=0), atol=TFLITE_TOL, rtol=TFLITE_TOL)


def test_converted_graph_is_the_layers_and_at_most_one_multiply_add(converted):
    # bn_conv and bn_dense vanish into their layers' weights; bn_pool, after
    # the pooling, may stay as a multiply and an add.
    allowance = collections.Counter({"MUL": 1, "ADD": 1})
    assert _op_counts(converted[1]) - allowance == collections.Counter(
        {"CONV_2D": 1, "MEAN": 1, "FULLY_CONNECTED": 2})


def _stack(*layers):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), *layers])
    return randomize_batch_norms(model)


def test_batch_norm_after_a_convolution_or_dense_folds_into_it(tmp_path):
    model = _stack(
        # Defaults are in the serving_cnn above; here without scale or offset.
        keras.layers.Conv2D(4, 3, use_bias=False), keras_bn.BatchNorm(scale=False),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(5),
        keras_bn.BatchNorm(center=False, scale=False),
    )
    baseline = _stack(
        keras.layers.Conv2D(4, 3), keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(5),
    )
    assert _extra_ops(model, baseline, tmp_path) == ({}, {})


def test_batch_norm_with_nothing_to_fold_into_costs_at_most_a_multiply_and_an_add(tmp_path):
    model = _stack(
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras_bn.BatchNorm(), keras.layers.Dense(5),
    )
    baseline = _stack(
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5),
    )
    extra, missing = _extra_ops(model, baseline, tmp_path)
    assert set(extra) <= {"MUL", "ADD"} and max(extra.values(), default=0) <= 1, extra
    assert not missing, missing


def test_folded_model_converts_to_the_ops_without_batch_norm(tmp_path):
    model = _stack(
        keras.layers.Conv2D(4, 3, use_bias=False), keras_bn.BatchNorm(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras_bn.BatchNorm(), keras.layers.Dense(5),
    )
    baseline = _stack(
        keras.layers.Conv2D(4, 3), keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5),
    )
    extra, missing = _extra_ops(keras_bn.fold_batch_norms(model), baseline, tmp_path)
    # The ChannelAffine: at most one MUL and one ADD (TF 2.16 and 2.17's
    # converters fold even those into the next layer).
    assert set(extra) <= {"MUL", "ADD"} and max(extra.values(), default=0) <= 1, extra
    assert not missing, missing
