"""`from_keras` / `to_keras`: every argument and weight carried across, Keras's
own layer as the oracle on keras.applications models, nested models, the
source left alone, overrides, and the options Keras's layer can't express."""

import inspect

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import BatchNorm
from keras_bn import from_keras
from keras_bn import to_keras
from tests.model_helpers import KERAS_RENORM
from tests.model_helpers import all_layers
from tests.model_helpers import needs_keras_renorm
from tests.model_helpers import randomize_batch_norms
from tests.model_helpers import serving_cnn
from tests.reference import random_params

# The two layers run the same formula with other kernels and summation
# orders, so each batch norm rounds differently in the last float32 ulps;
# 50 of them in a chain, with gamma up to 2, amplify that. Tolerances are
# relative to the largest output and 3x what was seen: 1e-5 in inference
# (EfficientNet logits of size 50 differing by 5e-4), 6e-5 for training-mode
# outputs, whose batch statistics carry every earlier layer's rounding.
INFERENCE_TOL = 3e-5
TRAINING_TOL = 3e-4
# A moving statistic moves by (1 - momentum) of the batch statistic's
# rounding difference: a few float32 ulps of O(1) values.
STATISTICS_TOL = 1e-6
# Keras's BatchNormalization arguments, all of which BatchNorm also takes.
SHARED = (
    "axis", "momentum", "epsilon", "center", "scale", "beta_initializer",
    "gamma_initializer", "moving_mean_initializer",
    "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
    "beta_constraint", "gamma_constraint", "synchronized", "renorm",
    "renorm_clipping", "renorm_momentum", "name", "trainable", "dtype",
)


def _mobilenet():
    """52 Keras batch norms with trained-looking weights; logits out, so a
    difference is not squashed by a softmax."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
        classifier_activation=None)
    return randomize_batch_norms(model)


def _images(n=4, size=32, seed=1):
    return np.random.RandomState(seed).normal(0.5, 1.0, (n, size, size, 3)).astype(
        np.float32)


def _nested():
    """A Sequential and a functional model with batch norms, inside a
    functional model; the Sequential is called twice."""
    block = keras.Sequential(
        [keras.Input((4, 4, 6)), keras.layers.Conv2D(6, 1),
         keras.layers.BatchNormalization(momentum=0.8)], name="block")
    inner_in = keras.Input((6,))
    inner = keras.Model(
        inner_in, keras.layers.BatchNormalization(epsilon=0.1)(
            keras.layers.Dense(6)(inner_in)), name="inner")
    inputs = keras.Input((4, 4, 6))
    x = block(block(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.BatchNormalization(name="top_bn")(x)
    outputs = inner(x)
    return randomize_batch_norms(keras.Model(inputs, outputs, name="outer"))


def zip_equal(a, b):
    """zip that insists on equal lengths (zip's strict=True is Python 3.10+)."""
    a, b = list(a), list(b)
    assert len(a) == len(b), (len(a), len(b))
    return zip(a, b)


def _assert_close(got, want, tol):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def _assert_same_statistics(keras_model, converted):
    matched = zip_equal(_batch_norms(keras_model, keras.layers.BatchNormalization),
                _batch_norms(converted, BatchNorm))
    for old, new in matched:
        np.testing.assert_allclose(
            new.moving_mean, old.moving_mean, rtol=STATISTICS_TOL, atol=STATISTICS_TOL)
        np.testing.assert_allclose(
            new.moving_variance, old.moving_variance, rtol=STATISTICS_TOL,
            atol=STATISTICS_TOL)


def _batch_norms(model, kind):
    return [layer for layer in all_layers(model) if type(layer) is kind]


@pytest.fixture(scope="module")
def mobilenet():
    """A source model and its conversion, for tests that change neither."""
    source = _mobilenet()
    return source, from_keras(source)


# Tier 1: the conversion itself, checked on its parts.

def test_every_keras_argument_is_copied():
    keras_layer = keras.layers.BatchNormalization(
        axis=1, momentum=0.95, epsilon=0.01, center=False,
        gamma_initializer="random_uniform", moving_mean_initializer="ones",
        moving_variance_initializer=keras.initializers.Constant(2.0),
        gamma_regularizer=keras.regularizers.L2(0.01),
        gamma_constraint=keras.constraints.NonNeg(), synchronized=True,
        name="my_bn", dtype="mixed_bfloat16")
    keras_layer.trainable = False
    source = keras.Sequential([keras.Input((3, 4)), keras_layer])
    (layer,) = from_keras(source).layers
    assert type(layer) is BatchNorm
    want, got = keras_layer.get_config(), layer.get_config()
    # Keras before 3.14 has no renorm arguments to compare.
    shared = [key for key in SHARED if KERAS_RENORM or not key.startswith("renorm")]
    assert {key: got[key] for key in shared} == {key: want[key] for key in shared}
    # Not keras_bn's defaults (0.9, 1e-5): those would change the function.
    assert (layer.momentum, layer.epsilon) == (0.95, 0.01)
    assert layer.dtype_policy.name == "mixed_bfloat16" and not layer.trainable


def test_all_weights_are_copied_exactly(mobilenet):
    source, converted = mobilenet
    assert len(_batch_norms(converted, BatchNorm)) == 52
    assert not _batch_norms(converted, keras.layers.BatchNormalization)
    want, got = source.get_weights(), converted.get_weights()
    assert len(got) == len(want)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def test_other_layers_keep_their_class_and_config(mobilenet):
    source, converted = mobilenet
    assert type(converted) is type(source) and converted.name == source.name
    for old, new in zip_equal(source.layers, converted.layers):
        assert new.name == old.name
        if type(old) is not keras.layers.BatchNormalization:
            assert type(new) is type(old) and new.get_config() == old.get_config()


def test_source_model_is_left_untouched():
    source = _mobilenet()
    before = source.get_weights()
    converted = from_keras(source)
    assert len(_batch_norms(source, keras.layers.BatchNormalization)) == 52
    for w, now in zip_equal(before, source.get_weights()):
        np.testing.assert_array_equal(now, w)
    shared = {id(v) for v in source.weights} & {id(v) for v in converted.weights}
    assert not shared


def test_overrides_apply_to_every_converted_layer():
    source = serving_cnn()
    converted = from_keras(to_keras(source), synchronized=True, fused=False)
    layers = _batch_norms(converted, BatchNorm)
    assert len(layers) == 3
    for layer in layers:
        assert layer.synchronized and layer.fused is False
        assert layer.momentum == 0.9  # copied from the source, not a default


def test_unknown_override_is_a_type_error():
    with pytest.raises(TypeError) as info:
        from_keras(serving_cnn(), sync=True, fused=False)
    # Every BatchNorm argument is accepted, whatever the layer gains later.
    accepted = [name for name in inspect.signature(BatchNorm).parameters
                if name != "kwargs"]
    assert accepted[:3] == ["axis", "momentum", "epsilon"]
    assert str(info.value) == (
        "from_keras: unknown override 'sync'; expected keras_bn.BatchNorm "
        f"arguments among {', '.join(accepted)}; received fused=False, "
        "sync=True."
    )


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError) as info:
        from_keras(keras.layers.BatchNormalization())
    assert str(info.value) == (
        "from_keras: argument `model` must be a keras.Sequential or a "
        "functional keras.Model; received an object of type "
        "BatchNormalization."
    )


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.bn = keras.layers.BatchNormalization()

    def call(self, x):
        return self.bn(x)


def test_subclassed_model_is_a_value_error():
    with pytest.raises(ValueError) as info:
        to_keras(_Subclassed())
    assert str(info.value) == (
        "to_keras: argument `model` must be a keras.Sequential or a "
        "functional keras.Model; received a subclassed model 'sub' of type "
        "_Subclassed, whose layer graph is not known."
    )


# Tier 2: Keras's own layer as the oracle, on a keras.applications model.

def test_inference_matches_keras(mobilenet):
    source, converted = mobilenet
    x = _images()
    _assert_close(converted.predict(x, verbose=0), source.predict(x, verbose=0),
                  INFERENCE_TOL)


def test_training_call_matches_keras():
    source = _mobilenet()
    converted = from_keras(source)
    x = _images()
    _assert_close(converted(x, training=True), source(x, training=True), TRAINING_TOL)
    # The call also updated the moving statistics.
    _assert_same_statistics(source, converted)


def test_train_step_updates_moving_statistics_as_keras():
    source = _mobilenet()
    converted = from_keras(source)
    x, y = _images(), np.arange(4)
    for model in (source, converted):
        # Eager: tracing two fit() train functions of 150 layers takes 30 s
        # here; the compiled step is checked on a small nested model.
        model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), run_eagerly=True)
        model.train_on_batch(x, y)
    # randomize_batch_norms left every statistic O(1) and away from the
    # batch's, so an update that is missing or wrong shows here. (Weights
    # are not compared: batches of 4 at 1x1 pixels in the last blocks make
    # the gradients ill-conditioned, 1e-2 apart after one step.)
    _assert_same_statistics(source, converted)


@pytest.mark.slow
def test_efficientnet_inference_matches_keras():
    # Beside 49 batch norms: Rescaling, Normalization (with weights),
    # squeeze-and-excitation blocks, Dropout.
    keras.utils.set_random_seed(0)
    source = randomize_batch_norms(keras.applications.EfficientNetB0(
        input_shape=(32, 32, 3), weights=None, classes=10,
        classifier_activation=None))
    converted = from_keras(source)
    assert len(_batch_norms(converted, BatchNorm)) == 49
    x = 255.0 * np.abs(_images())
    _assert_close(converted.predict(x, verbose=0), source.predict(x, verbose=0),
                  INFERENCE_TOL)


def test_nested_models_are_converted():
    source = _nested()
    converted = from_keras(source)
    block, inner = converted.get_layer("block"), converted.get_layer("inner")
    assert isinstance(block, keras.Sequential) and block is not source.get_layer("block")
    assert [type(layer) for layer in block.layers][-1] is BatchNorm
    assert block.layers[-1].momentum == 0.8 and inner.layers[-1].epsilon == 0.1
    assert type(converted.get_layer("top_bn")) is BatchNorm
    assert len(_batch_norms(source, keras.layers.BatchNormalization)) == 3
    # The block called twice is still one block: no second set of weights.
    assert len(converted.weights) == len(source.weights)
    x = np.random.RandomState(2).normal(0.5, 1.0, (8, 4, 4, 6)).astype(np.float32)
    _assert_close(converted(x), source(x), INFERENCE_TOL)
    _assert_close(converted(x, training=True), source(x, training=True), TRAINING_TOL)


def test_frozen_parts_stay_frozen():
    source = _nested()
    source.get_layer("block").trainable = False
    source.get_layer("top_bn").trainable = False
    converted = from_keras(source)
    assert not converted.get_layer("block").trainable
    assert not converted.get_layer("top_bn").trainable
    assert converted.get_layer("inner").trainable
    assert len(converted.trainable_weights) == len(source.trainable_weights) == 4


def test_compiled_train_step_updates_moving_statistics_as_keras():
    source = _nested()
    converted = from_keras(source)
    x = np.random.RandomState(2).normal(0.5, 1.0, (8, 4, 4, 6)).astype(np.float32)
    for model in (source, converted):
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(x, np.zeros((8, 6)), batch_size=4, epochs=1, verbose=0)
    _assert_same_statistics(source, converted)
    for w, g in zip_equal(source.get_weights(), converted.get_weights()):
        np.testing.assert_allclose(g, w, rtol=TRAINING_TOL, atol=TRAINING_TOL)


def test_input_names_and_plain_operations_are_kept():
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
    source = keras.Model({"a": a, "b": b}, keras.layers.BatchNormalization()(a + b))
    converted = from_keras(source)
    assert [layer.name for layer in converted.layers][:2] == ["a", "b"]
    x = {"a": np.ones((2, 3), np.float32), "b": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    _assert_close(converted(x), source(x), INFERENCE_TOL)


def test_compiled_model_stays_compiled():
    source = serving_cnn()
    source.compile("adam", "mse")
    assert from_keras(source).compiled and to_keras(source).compiled


@needs_keras_renorm
def test_renorm_layer_matches_keras():
    keras_layer = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.5},
        renorm_momentum=0.9, momentum=0.9)
    source = keras.Sequential([keras.Input((5,)), keras_layer])
    rng = np.random.RandomState(0)
    # gamma, beta, moving_mean, moving_variance, moving_stddev, renorm_mean,
    # renorm_stddev; the renorm statistics well away from the batch's so
    # that the clipping bites.
    keras_layer.set_weights([
        rng.uniform(0.5, 2.0, 5), rng.uniform(-1, 1, 5), rng.uniform(-1, 1, 5),
        rng.uniform(0.5, 2.0, 5), rng.uniform(0.7, 1.4, 5), rng.uniform(-3, 3, 5),
        rng.uniform(0.2, 4.0, 5)])
    converted = from_keras(source)
    (layer,) = converted.layers
    assert layer.renorm and layer.renorm_clipping == {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}
    for w, g in zip_equal(source.get_weights(), converted.get_weights()):
        np.testing.assert_array_equal(g, w)
    x = rng.normal(0.5, 2.0, (16, 5)).astype(np.float32)
    _assert_close(converted(x, training=True), source(x, training=True), INFERENCE_TOL)
    for w, g in zip_equal(source.get_weights(), converted.get_weights()):
        np.testing.assert_allclose(g, w, rtol=STATISTICS_TOL, atol=STATISTICS_TOL)
    (back,) = to_keras(converted).layers
    assert back.get_config() == keras_layer.get_config()
    for w, g in zip_equal(converted.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(g, w)


# Tier 3: to_keras, the way back for people without keras_bn.

def test_round_trip_gives_back_the_keras_model(mobilenet):
    source, converted = mobilenet
    back = to_keras(converted)
    assert len(_batch_norms(back, keras.layers.BatchNormalization)) == 52
    assert not _batch_norms(back, BatchNorm)
    for old, new in zip_equal(source.layers, back.layers):
        assert type(new) is type(old) and new.get_config() == old.get_config()
    x = _images()
    np.testing.assert_array_equal(back.predict(x, verbose=0), source.predict(x, verbose=0))


def test_kernel_choice_and_guard_are_dropped():
    source = keras.Sequential([keras.Input((3,)), BatchNorm(
        fused=False, guard_bad_batches=False, momentum=0.7, epsilon=0.2, name="bn")])
    (layer,) = to_keras(source).layers
    assert type(layer) is keras.layers.BatchNormalization
    assert (layer.name, layer.momentum, layer.epsilon) == ("bn", 0.7, 0.2)


def test_batch_count_is_dropped_on_the_way_out_and_starts_at_zero_on_the_way_in():
    layer = BatchNorm(track_num_batches=True, name="bn")
    source = keras.Sequential([keras.Input((3,)), layer])
    layer.set_weights([p.astype(np.float32) for p in random_params(3)] + [np.int64(7)])
    (back,) = to_keras(source).layers
    assert [v.name for v in back.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    for w, g in zip_equal(layer.get_weights()[:4], back.get_weights()):
        np.testing.assert_array_equal(g, w)
    (again,) = from_keras(to_keras(source), track_num_batches=True).layers
    assert int(again.num_batches_tracked.numpy()) == 0
    for w, g in zip_equal(layer.get_weights()[:4], again.get_weights()[:4]):
        np.testing.assert_array_equal(g, w)


def _callable_bound(step):
    return 1.0 + step


def _adjustment(shape):
    return 1.0, 0.0


@pytest.mark.parametrize("kwargs,message", [
    ({"momentum": None},
     "argument `momentum` must be a number (Keras keeps no cumulative "
     "average) there; received momentum=None."),
    ({"virtual_batch_size": 2},
     "argument `virtual_batch_size` must be None (Keras has no ghost batch "
     "normalization) there; received virtual_batch_size=2."),
    ({"track_running_stats": False},
     "argument `track_running_stats` must be True (Keras's layer infers with "
     "its moving statistics) there; received track_running_stats=False."),
    ({"unbiased_moving_variance": True},
     "argument `unbiased_moving_variance` must be False (Keras's moving "
     "variance follows the biased batch variance) there; received "
     "unbiased_moving_variance=True."),
    ({"adjustment": _adjustment},
     "argument `adjustment` must be None (Keras 3's layer has no adjustment) "
     f"there; received adjustment={_adjustment!r}."),
    ({"renorm": True, "renorm_clipping": {"rmax": _callable_bound}},
     "argument `renorm_clipping` must be a dict of numbers (Keras takes no "
     "schedule or callable bound) there; received renorm_clipping={'rmax': "
     f"{_callable_bound!r}}}."),
])
def test_options_keras_lacks_are_value_errors(kwargs, message):
    source = keras.Sequential([keras.Input((3,)), BatchNorm(name="bn", **kwargs)])
    with pytest.raises(ValueError) as info:
        to_keras(source)
    assert str(info.value) == (
        "to_keras: BatchNorm 'bn' has no keras.layers.BatchNormalization "
        f"equivalent: {message}")


def test_calls_on_two_ranks_are_a_value_error():
    bn = BatchNorm(name="bn")
    a, b = keras.Input((3,)), keras.Input((5, 3))
    source = keras.Model([a, b], [bn(a), bn(b)], name="two_ranks")
    with pytest.raises(ValueError) as info:
        to_keras(source)
    assert str(info.value) == (
        "to_keras: BatchNorm 'bn' has no keras.layers.BatchNormalization "
        "equivalent: Keras's layer takes inputs of the one rank it was built "
        "for; received calls on inputs of ranks [2, 3] in model 'two_ranks'."
    )


def test_other_keras_bn_layers_are_a_value_error():
    folded = keras_bn.fold_batch_norms(serving_cnn())
    with pytest.raises(ValueError) as info:
        to_keras(folded)
    assert str(info.value) == (
        "to_keras: argument `model` must hold no keras_bn layer but "
        "BatchNorm, which Keras has no layer for; received layer 'bn_pool' "
        "of type keras_bn.ChannelAffine."
    )
