"""`fold_batch_norms`: each layer kind, ours and Keras's batch norm, the
`ChannelAffine` fallback, nested models, the original left alone."""

import keras
import numpy as np
import pytest

from keras_bn import BatchNorm
from keras_bn import ChannelAffine
from keras_bn import fold_batch_norms
from tests.model_helpers import BATCH_NORMS
from tests.model_helpers import all_layers
from tests.model_helpers import randomize_batch_norms
from tests.model_helpers import serving_cnn

# Folding moves the per-channel multiply in front of the layer's sums, so
# float32 rounds in another place: a few ulps of O(1-10) outputs.
FOLD_TOL = 1e-4

# input shape, the layer before the batch norm, the batch norm's axis
KINDS = {
    "dense": ((5,), lambda: keras.layers.Dense(4, use_bias=False), -1),
    "dense_rank3": ((3, 5), lambda: keras.layers.Dense(4), -1),
    "conv1d": ((7, 3), lambda: keras.layers.Conv1D(4, 3), -1),
    "conv2d": ((6, 6, 3), lambda: keras.layers.Conv2D(4, 3, use_bias=False), -1),
    "conv2d_channels_first": (
        (3, 6, 8), lambda: keras.layers.Conv2D(5, 3, data_format="channels_first"), 1),
    "conv3d": ((4, 4, 4, 2), lambda: keras.layers.Conv3D(3, 2, use_bias=False), -1),
    "depthwise_conv1d": (
        (7, 3), lambda: keras.layers.DepthwiseConv1D(3, depth_multiplier=2), -1),
    "depthwise_conv2d": (
        (6, 6, 3),
        lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False), -1),
}


def _batch_norm(kind, **kwargs):
    if kind == "keras_bn":
        return BatchNorm(**kwargs)
    return keras.layers.BatchNormalization(**kwargs)


def _sequential(input_shape, *layers):
    keras.utils.set_random_seed(0)
    return randomize_batch_norms(keras.Sequential([keras.Input(input_shape), *layers]))


def _assert_same_outputs(model, folded):
    shapes = [tuple(x.shape[1:]) for x in model.inputs]
    rng = np.random.RandomState(1)
    xs = [rng.normal(0.5, 1.0, (4, *shape)).astype(np.float32) for shape in shapes]
    xs = xs[0] if len(xs) == 1 else xs
    want = keras.tree.flatten(model(xs, training=False))
    got = keras.tree.flatten(folded(xs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=FOLD_TOL, rtol=FOLD_TOL)


_CONVOLUTION_OP = keras.layers.Conv2D.convolution_op


def _conv2d_through_channels_last(conv, inputs, kernel):
    """A Conv2D's convolution; a channels-first one's computed channels-last
    between two transposes (Keras keeps one kernel layout for both)."""
    if conv.data_format != "channels_first":
        return _CONVOLUTION_OP(conv, inputs, kernel)
    outputs = keras.ops.conv(
        keras.ops.transpose(inputs, (0, 2, 3, 1)), kernel, strides=list(conv.strides),
        padding=conv.padding, dilation_rate=conv.dilation_rate, data_format="channels_last")
    return keras.ops.transpose(outputs, (0, 3, 1, 2))


@pytest.fixture
def channels_first_conv2d(monkeypatch, channels_first_conv2d_runs):
    """Lets channels-first Conv2D layers run where TensorFlow has no kernel
    for them (its Eigen CPU kernel is NHWC only; oneDNN's and cuDNN's are
    not) by `_conv2d_through_channels_last`. Folding changes weights, not
    layers, so the model and its folded copy still compare on one route."""
    if not channels_first_conv2d_runs:
        monkeypatch.setattr(keras.layers.Conv2D, "convolution_op", _conv2d_through_channels_last)


def test_channels_last_route_is_a_channels_first_conv2d(needs_channels_first_conv2d):
    conv = keras.layers.Conv2D(5, 3, strides=(2, 1), padding="same", data_format="channels_first")
    x = np.random.RandomState(5).normal(0.5, 1.0, (2, 3, 7, 6)).astype(np.float32)
    conv.build(x.shape)
    # Two kernels sum 27 products of O(1) in their own orders: float32 ulps.
    np.testing.assert_allclose(
        _conv2d_through_channels_last(conv, x, conv.kernel), conv.convolution_op(x, conv.kernel),
        atol=1e-5, rtol=1e-5)


def _assert_no_batch_norm(model):
    assert not [layer for layer in all_layers(model) if isinstance(layer, BATCH_NORMS)]


@pytest.mark.parametrize("bn_kind", ["keras_bn", "keras"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_folds_into_each_layer_kind(kind, bn_kind, channels_first_conv2d):
    input_shape, make_layer, axis = KINDS[kind]
    model = _sequential(input_shape, make_layer(), _batch_norm(bn_kind, axis=axis))
    folded = fold_batch_norms(model)
    assert type(folded) is keras.Sequential
    (layer,) = folded.layers
    assert type(layer) is type(model.layers[0])
    assert layer.name == model.layers[0].name
    assert layer.use_bias  # added where there was none
    _assert_same_outputs(model, folded)


@pytest.mark.parametrize("bn_kind", ["keras_bn", "keras"])
@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_folds_without_offset_or_scale(center, scale, bn_kind):
    model = _sequential(
        (6, 6, 3), keras.layers.Conv2D(4, 3, use_bias=False),
        _batch_norm(bn_kind, center=center, scale=scale))
    folded = fold_batch_norms(model)
    assert len(folded.layers) == 1
    _assert_same_outputs(model, folded)


def test_folded_weights_follow_the_formula():
    model = _sequential((2,), keras.layers.Dense(3), BatchNorm(epsilon=0.1))
    kernel, bias = (w.astype(np.float64) for w in model.layers[0].get_weights())
    gamma, beta, mean, var = (w.astype(np.float64) for w in model.layers[1].get_weights())
    a = gamma / np.sqrt(var + 0.1)
    got_kernel, got_bias = fold_batch_norms(model).layers[0].get_weights()
    assert got_kernel.dtype == got_bias.dtype == np.float32
    # Folded in float64 and rounded once: within half a float32 ulp (6e-8).
    np.testing.assert_allclose(got_kernel, kernel * a, rtol=1e-7)
    np.testing.assert_allclose(got_bias, bias * a + beta - mean * a, rtol=1e-7)


def _functional(build, bn):
    """A functional model from `build(inputs, bn) -> outputs` on 6x6x3 images."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    return randomize_batch_norms(keras.Model(inputs, build(inputs, bn)))


def _after_pooling(x, bn):
    return bn(keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(x)))


def _after_a_nonlinear_activation(x, bn):
    return bn(keras.layers.Conv2D(4, 3, activation="relu")(x))


def _on_the_input(x, bn):
    return keras.layers.Conv2D(4, 3)(bn(x))


def _on_another_axis(x, bn):
    return bn(keras.layers.Conv2D(4, 3)(x))  # bn normalizes rows, not channels


def _after_an_output_that_feeds_another_layer(x, bn):
    y = keras.layers.Conv2D(4, 3)(x)
    return keras.layers.Add()([bn(y), y])


def _after_an_output_that_is_a_model_output(x, bn):
    y = keras.layers.Conv2D(4, 3)(x)
    return [bn(y), y]


def _after_a_layer_called_twice(x, bn):
    conv = keras.layers.Conv2D(3, 1)
    return bn(conv(conv(x)))


def _called_twice(x, bn):
    return keras.layers.Add()([bn(keras.layers.Conv2D(4, 1)(x)), bn(keras.layers.Conv2D(4, 1)(x))])


def _after_channels_first_as_wide_as_deep(x, bn):
    # (4, 4, 4) out: Keras would add a folded bias on the last axis.
    x = keras.layers.Permute((3, 1, 2))(x)
    return bn(keras.layers.Conv2D(4, 3, use_bias=False, data_format="channels_first")(x))


def _after_a_nested_model(x, bn):
    inner = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3)])
    return bn(inner(x))


UNFOLDABLE = {
    "after_pooling": (_after_pooling, {}),
    "after_a_nonlinear_activation": (_after_a_nonlinear_activation, {}),
    "on_the_input": (_on_the_input, {}),
    "on_another_axis": (_on_another_axis, {"axis": 1}),
    "after_an_output_that_feeds_another_layer": (_after_an_output_that_feeds_another_layer, {}),
    "after_an_output_that_is_a_model_output": (_after_an_output_that_is_a_model_output, {}),
    "after_a_layer_called_twice": (_after_a_layer_called_twice, {}),
    "called_twice": (_called_twice, {}),
    "after_a_nested_model": (_after_a_nested_model, {}),
    "after_channels_first_as_wide_as_deep": (_after_channels_first_as_wide_as_deep, {"axis": 1}),
}


@pytest.mark.parametrize("bn_kind", ["keras_bn", "keras"])
@pytest.mark.parametrize("case", sorted(UNFOLDABLE))
def test_unfoldable_batch_norm_becomes_a_channel_affine(case, bn_kind, channels_first_conv2d):
    build, kwargs = UNFOLDABLE[case]
    model = _functional(build, _batch_norm(bn_kind, name="bn", **kwargs))
    folded = fold_batch_norms(model)
    assert not isinstance(folded, keras.Sequential)
    affine = folded.get_layer("bn")
    assert type(affine) is ChannelAffine
    assert affine.axis == model.get_layer("bn").axis
    assert [w.trainable for w in affine.weights] == [False, False]
    _assert_no_batch_norm(folded)
    _assert_same_outputs(model, folded)


def test_nested_models_are_folded_inside():
    block = keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        BatchNorm(),
        keras.layers.ReLU(),
    ], name="block")
    inputs = keras.Input((6, 6, 3))
    x = BatchNorm(name="after_block")(block(inputs))
    x = keras.layers.Dense(2, use_bias=False)(keras.layers.Flatten()(x))
    outer = keras.Model(inputs, keras.layers.BatchNormalization()(x))
    model = randomize_batch_norms(keras.Sequential([keras.Input((6, 6, 3)), outer]))
    folded = fold_batch_norms(model)
    _assert_no_batch_norm(folded)
    (folded_outer,) = folded.layers
    assert [type(layer).__name__ for layer in folded_outer.get_layer("block").layers] == [
        "Conv2D", "ReLU"]
    assert type(folded_outer.get_layer("after_block")) is ChannelAffine
    _assert_same_outputs(model, folded)


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_original_model_is_untouched(kind):
    model = serving_cnn()
    if kind == "sequential":
        model = randomize_batch_norms(keras.Sequential(
            [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), BatchNorm(),
             keras.layers.GlobalAveragePooling2D(), BatchNorm()]))
    x = np.random.RandomState(2).normal(0.0, 1.0, (3, 8, 8, 3)).astype(np.float32)
    config, layers = model.get_config(), list(model.layers)
    weights, outputs = [w.numpy().copy() for w in model.weights], model(x).numpy()
    folded = fold_batch_norms(model)
    assert model.get_config() == config
    assert model.layers == layers
    for w, before in zip(model.weights, weights):
        np.testing.assert_array_equal(w.numpy(), before)
    np.testing.assert_array_equal(model(x).numpy(), outputs)
    assert not {id(w) for w in model.weights} & {id(w) for w in folded.weights}


def test_folded_model_keras_file_round_trip(tmp_path):
    folded = fold_batch_norms(serving_cnn())
    assert [layer.name for layer in folded.layers if "bn" in layer.name] == ["bn_pool"]
    folded.save(tmp_path / "folded.keras")
    loaded = keras.saving.load_model(tmp_path / "folded.keras")  # no custom_objects
    assert type(loaded.get_layer("bn_pool")) is ChannelAffine
    assert loaded.get_layer("bn_pool").get_config() == folded.get_layer("bn_pool").get_config()
    for a, b in zip(loaded.get_weights(), folded.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.RandomState(3).normal(0.0, 1.0, (3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), folded(x))


def test_compiled_model_gives_a_compiled_copy():
    model = _sequential((5,), keras.layers.Dense(4), BatchNorm())
    model.compile("sgd", "mse")
    folded = fold_batch_norms(model)
    assert folded.compiled
    assert folded.get_compile_config() == model.get_compile_config()


def test_mixed_precision_folds_into_float32_weights():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _sequential((6, 6, 3), keras.layers.Conv2D(4, 3), BatchNorm())
    folded = fold_batch_norms(model)
    conv = folded.layers[0]
    assert conv.kernel.dtype == conv.bias.dtype == "float32"
    assert conv.compute_dtype == "float16"
    x = np.random.RandomState(4).normal(0.0, 1.0, (2, 6, 6, 3)).astype(np.float32)
    # float16 outputs of O(1-10): a few half-precision ulps apart.
    np.testing.assert_allclose(folded(x), model(x), atol=2e-2, rtol=2e-2)


def test_channel_affine_hand_computed():
    layer = ChannelAffine(axis=1)
    x = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)  # channels are rows
    layer.build(x.shape)
    layer.set_weights([np.array([2.0, -1.0], np.float32), np.array([0.5, 1.0], np.float32)])
    np.testing.assert_array_equal(layer(x), [[[2.5, 4.5], [-2.0, -3.0]]])
    clone = ChannelAffine.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_rejects_what_is_not_a_model():
    with pytest.raises(TypeError) as error:
        fold_batch_norms(keras.layers.Dense(2))
    assert str(error.value) == (
        "fold_batch_norms: argument `model` must be a keras.Sequential or a "
        "functional keras.Model; received an object of type Dense.")


def test_rejects_an_unbuilt_sequential_model():
    with pytest.raises(ValueError) as error:
        fold_batch_norms(keras.Sequential([keras.layers.Dense(2), BatchNorm()], name="net"))
    assert str(error.value) == (
        "fold_batch_norms: the Sequential model 'net' is not built; start it "
        "with a keras.Input or call it on data first.")


def test_rejects_a_subclassed_model():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(ValueError) as error:
        fold_batch_norms(Subclassed())
    assert str(error.value) == (
        "fold_batch_norms: argument `model` must be a keras.Sequential or a "
        "functional keras.Model; received a subclassed model 'sub' of type "
        "Subclassed, whose layer graph is not known.")
