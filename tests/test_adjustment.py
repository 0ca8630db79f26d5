"""tf_keras's `adjustment`: a (scale, bias) pair applied to the normalized
values in training, before gamma and beta, and nowhere else.

tf_keras's own cases (testAdjustment, testRenormWithAdjustment) against a
float64 NumPy reference, in tf.function and under XLA; gradients of the
first and second order against autodiff of the plain formula; the errors;
the config, the .keras file and a SavedModel served in another process.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from tests.model_helpers import images
from tests.model_helpers import randomize_batch_norms
from tests.model_helpers import serve_without_keras_bn
from tests.reference import penalty_gradient

# float32 outputs of O(1-10) after a mean, a variance and an rsqrt over a
# handful of values: a few ulps, well inside 1e-5 relative (tf_keras's own
# tests take 1e-5 absolute).
F32_TOL = 1e-5
# float64 everywhere: the custom backward pass and autodiff of the formula
# add the same terms in another order, a few ulps of O(1) values.
F64_TOL = 1e-9
MODES = ["eager", "graph", "xla"]


@keras.saving.register_keras_serializable(package="keras_bn_tests")
def channel_ramp(shape):
    """A deterministic per-channel adjustment, registered so that it saves
    by name: scale 0.5 .. 1.5 and bias -0.2 .. 0.2 across the channels."""
    ramp = tf.linspace(0.0, 1.0, shape[-1])
    return 0.5 + ramp, 0.4 * ramp - 0.2


class _Adjustment:
    """tf_keras's test adjustment: per-channel scale in [0.5, 1.5] and bias
    in [-0.2, 0.2], drawn afresh (here: assigned) before each step; counts
    its calls."""

    def __init__(self, channels, dtype="float32"):
        self.scale = tf.Variable(tf.ones(channels, dtype))
        self.bias = tf.Variable(tf.zeros(channels, dtype))
        self.calls = 0

    def draw(self, rng):
        self.scale.assign(rng.uniform(0.5, 1.5, self.scale.shape))
        self.bias.assign(rng.uniform(-0.2, 0.2, self.bias.shape))
        return self.scale.numpy().astype(np.float64), self.bias.numpy().astype(np.float64)

    def __call__(self, shape):
        self.calls += 1
        return self.scale, self.bias


def _runner(layer, mode):
    def call(x):
        return layer(x, training=True)
    if mode == "eager":
        return call
    return tf.function(call, jit_compile=(mode == "xla"))


def _tf_keras_layer(adjustment, **kwargs):
    """The layer of tf_keras's testAdjustment: axis 1 of a (4, 3) input,
    gamma 2, beta 3, epsilon 1e-3, momentum 0.99."""
    layer = BatchNorm(
        axis=1, gamma_initializer=keras.initializers.Constant(2.0),
        beta_initializer=keras.initializers.Constant(3.0), epsilon=1e-3,
        momentum=0.99, adjustment=adjustment, **kwargs)
    layer.build((None, 3))
    return layer


# --- tf_keras's cases --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_tf_keras_adjustment_case(mode):
    adjustment = _Adjustment(3)
    layer = _tf_keras_layer(adjustment)
    run = _runner(layer, mode)
    gamma, beta, epsilon, momentum = 2.0, 3.0, 1e-3, 0.99
    moving_mean, moving_variance = np.zeros(3), np.ones(3)
    rng = np.random.RandomState(0)
    for _ in range(5):
        x = rng.random_sample((4, 3))
        scale, bias = adjustment.draw(rng)
        mean, variance = x.mean(0), x.var(0)
        want_train = ((x - mean) / np.sqrt(variance + epsilon) * scale + bias) * gamma + beta
        moving_mean += (mean - moving_mean) * (1 - momentum)
        moving_variance += (variance - moving_variance) * (1 - momentum)
        want_test = (x - moving_mean) / np.sqrt(moving_variance + epsilon) * gamma + beta
        np.testing.assert_allclose(run(x.astype(np.float32)), want_train,
                                   rtol=F32_TOL, atol=F32_TOL)
        np.testing.assert_allclose(layer(x.astype(np.float32), training=False), want_test,
                                   rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_mean, moving_mean, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, moving_variance,
                               rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_tf_keras_renorm_with_adjustment_case(mode):
    # The renorm correction first, then the adjustment, then gamma and beta.
    adjustment = _Adjustment(3)
    clipping = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}
    layer = _tf_keras_layer(adjustment, renorm=True, renorm_clipping=clipping,
                            renorm_momentum=0.8)
    run = _runner(layer, mode)
    gamma, beta, epsilon, momentum, renorm_momentum = 2.0, 3.0, 1e-3, 0.99, 0.8
    moving_mean, moving_stddev = np.zeros(3), np.ones(3)
    renorm_mean, renorm_stddev = np.zeros(3), np.ones(3)
    rng = np.random.RandomState(1)
    for _ in range(5):
        x = rng.random_sample((4, 3))
        scale, bias = adjustment.draw(rng)
        mean, stddev = x.mean(0), np.sqrt(x.var(0) + epsilon)
        r = np.clip(stddev / renorm_stddev, 0.9, 1.1)
        d = np.clip((mean - renorm_mean) / renorm_stddev, -0.1, 0.1)
        want_train = (((x - mean) / stddev * r + d) * scale + bias) * gamma + beta
        renorm_mean += (mean - renorm_mean) * (1 - renorm_momentum)
        renorm_stddev += (stddev - renorm_stddev) * (1 - renorm_momentum)
        moving_mean += (mean - moving_mean) * (1 - momentum)
        moving_stddev += (stddev - moving_stddev) * (1 - momentum)
        want_test = (x - moving_mean) / moving_stddev * gamma + beta
        np.testing.assert_allclose(run(x.astype(np.float32)), want_train,
                                   rtol=F32_TOL, atol=F32_TOL)
        np.testing.assert_allclose(layer(x.astype(np.float32), training=False), want_test,
                                   rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.renorm_mean, renorm_mean, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.renorm_stddev, renorm_stddev, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_stddev, moving_stddev, rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("scale, center", [(True, False), (False, True), (False, False)])
def test_without_gamma_or_beta_the_adjustment_still_applies(scale, center):
    x = np.random.RandomState(2).normal(1.0, 2.0, (6, 2, 3))
    layer = BatchNorm(scale=scale, center=center, adjustment=channel_ramp)
    layer.build((None, 2, 3))
    if scale:
        layer.gamma.assign([2.0, -1.0, 0.5])
    if center:
        layer.beta.assign([1.0, 0.5, -3.0])
    gamma = layer.gamma.numpy() if scale else 1.0
    beta = layer.beta.numpy() if center else 0.0
    adjust_scale, adjust_bias = np.array([0.5, 1.0, 1.5]), np.array([-0.2, 0.0, 0.2])
    x_hat = (x - x.mean((0, 1))) / np.sqrt(x.var((0, 1)) + 1e-5)
    want = gamma * (adjust_scale * x_hat + adjust_bias) + beta
    np.testing.assert_allclose(layer(x.astype(np.float32), training=True), want,
                               rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("pair", [(1.5, -0.25), ([1.5], [-0.25]),
                                  (tf.constant(1.5), tf.constant([-0.25]))])
def test_one_value_for_all_channels_is_broadcast(pair):
    # tf_keras's own test passes Python numbers: `lambda _: (1, 0)`.
    x = np.random.RandomState(3).normal(0.0, 1.0, (5, 3)).astype(np.float32)
    layer = BatchNorm(adjustment=lambda shape: pair)
    plain = BatchNorm(fused=False)
    for bn in (layer, plain):
        bn.build((None, 3))
    np.testing.assert_allclose(layer(x, training=True), 1.5 * plain(x, training=True) - 0.25,
                               rtol=F32_TOL, atol=F32_TOL)


# --- training only, statistics untouched -------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True, "renorm_clipping": {"rmax": 1.2}},
                                    {"momentum": None}])
def test_moving_statistics_and_inference_are_those_without_adjustment(kwargs):
    adjustment = _Adjustment(3)
    layer = BatchNorm(adjustment=adjustment, **kwargs)
    plain = BatchNorm(fused=False, **kwargs)  # the same TF-ops kernel
    for bn in (layer, plain):
        bn.build((None, 3))
    rng = np.random.RandomState(4)
    for _ in range(3):
        adjustment.draw(rng)
        x = rng.normal(1.0, 2.0, (8, 3)).astype(np.float32)
        assert not np.allclose(layer(x, training=True), plain(x, training=True))
    for ours, theirs in zip(layer.weights, plain.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.name)
    calls = adjustment.calls
    np.testing.assert_array_equal(layer(x), plain(x))
    np.testing.assert_array_equal(layer(x, training=False), plain(x, training=False))
    assert adjustment.calls == calls  # inference never calls it


def test_trainable_false_ignores_the_adjustment():
    layer = BatchNorm(adjustment=channel_ramp, trainable=False)
    plain = BatchNorm(trainable=False)
    x = np.random.RandomState(5).normal(1.0, 2.0, (4, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer(x, training=True), plain(x, training=True))


def test_symbolic_training_flag_applies_it_in_the_training_branch_only():
    adjustment = _Adjustment(3)
    adjustment.draw(np.random.RandomState(6))
    layer = BatchNorm(adjustment=adjustment)
    twin = BatchNorm(adjustment=adjustment)  # eager, Python flags
    for bn in (layer, twin):
        bn.build((None, 3))
    step = tf.function(lambda x, training: layer(x, training=training))
    x = np.random.RandomState(7).normal(1.0, 2.0, (8, 3)).astype(np.float32)
    np.testing.assert_allclose(step(x, tf.constant(False)), twin(x, training=False),
                               rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))
    np.testing.assert_allclose(step(x, tf.constant(True)), twin(x, training=True),
                               rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_mean, twin.moving_mean, rtol=F32_TOL)
    # Traced once with both branches; the adjustment only in the training one.
    assert adjustment.calls == 2  # the trace and the eager twin's training call


def test_the_adjustment_receives_the_dynamic_input_shape():
    seen = []

    def adjustment(shape):
        seen.append(shape)
        return 1.0, 0.0

    layer = BatchNorm(axis=1, adjustment=adjustment)
    layer.build((None, 3, 4))
    step = tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec([None, 3, None], tf.float32)])
    step(np.zeros((2, 3, 5), np.float32))
    layer(np.zeros((2, 3, 4), np.float32), training=True)
    traced, eager = seen
    assert traced.dtype == tf.int32 and traced.shape.as_list() == [3]
    np.testing.assert_array_equal(eager, [2, 3, 4])


# --- gradients ---------------------------------------------------------------


def _float64_case(seed=8):
    rng = np.random.RandomState(seed)
    x = tf.constant(rng.normal(0.5, 2.0, (6, 3)))
    v = tf.constant(rng.normal(0.0, 1.0, (6, 3)))
    adjustment = _Adjustment(3, "float64")
    adjustment.draw(rng)
    layer = BatchNorm(dtype="float64", adjustment=adjustment)
    layer.build((None, 3))
    layer.gamma.assign(rng.uniform(0.5, 2.0, 3))
    layer.beta.assign(rng.uniform(-1.0, 1.0, 3))
    return x, v, layer, adjustment


def _reference(layer, adjustment):
    """Training-mode batch norm with the adjustment, by autodiff-able TF ops."""
    def f(x):
        mean, variance = tf.nn.moments(x, [0])
        x_hat = (x - mean) / tf.sqrt(variance + 1e-5)
        return layer.gamma.value * (adjustment.scale * x_hat + adjustment.bias) + layer.beta.value
    return f


def _sources(x, layer, adjustment):
    return [x, layer.gamma.value, layer.beta.value, adjustment.scale, adjustment.bias]


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_autodiff_of_the_formula(mode):
    x, v, layer, adjustment = _float64_case()

    def gradients(f):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(f(x) * v)
        return tape.gradient(loss, _sources(x, layer, adjustment))

    ours = gradients(lambda x: layer(x, training=True)) if mode == "eager" else tf.function(
        lambda: gradients(lambda x: layer(x, training=True)), jit_compile=(mode == "xla"))()
    for name, a, b in zip("x gamma beta scale bias".split(), ours,
                          gradients(_reference(layer, adjustment))):
        np.testing.assert_allclose(a, b, rtol=F64_TOL, atol=F64_TOL, err_msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_second_order_matches_autodiff_of_the_formula(mode):
    # d/d(x, gamma, beta, scale, bias) of |d(sum(f(x) * v))/dx|^2, a gradient
    # penalty's gradient, as tests/test_gradients.py checks it without the
    # adjustment. beta has no second-order effect: None both ways.
    x, v, layer, adjustment = _float64_case(seed=9)

    def second(f):
        return penalty_gradient(f, x, v, _sources(x, layer, adjustment))

    def ours():
        return second(lambda x: layer(x, training=True))

    ours = ours() if mode == "eager" else tf.function(ours, jit_compile=(mode == "xla"))()
    for name, a, b in zip("x gamma beta scale bias".split(), ours,
                          second(_reference(layer, adjustment))):
        if b is None:
            assert a is None or not np.any(a), name
        else:
            np.testing.assert_allclose(a, b, rtol=F64_TOL, atol=F64_TOL, err_msg=name)


# --- errors --------------------------------------------------------------------


def test_fused_true_with_an_adjustment_is_refused_in_the_constructor():
    with pytest.raises(ValueError) as info:
        BatchNorm(fused=True, adjustment=channel_ramp, name="bn")
    assert str(info.value) == (
        "BatchNorm 'bn': argument `adjustment` needs the TF-ops path, but fused=True "
        f"requires TensorFlow's fused kernel; received adjustment={channel_ramp!r} with "
        "fused=True. Pass fused=None (the default) or False.")


def test_virtual_batch_size_with_an_adjustment_is_refused_in_the_constructor():
    # tf_keras refuses the pair too ("When using `virtual_batch_size`,
    # adjustment cannot be specified").
    with pytest.raises(ValueError) as info:
        BatchNorm(virtual_batch_size=2, adjustment=channel_ramp, name="bn")
    assert str(info.value) == (
        "BatchNorm 'bn': arguments `virtual_batch_size` and `adjustment` don't combine "
        "(the adjustment acts on the whole batch); received virtual_batch_size=2, "
        f"adjustment={channel_ramp!r}. Pass adjustment=None for ghost batches.")


def test_a_non_callable_adjustment_is_refused_in_the_constructor():
    with pytest.raises(TypeError) as info:
        BatchNorm(adjustment=(1.0, 0.0), name="bn")
    assert str(info.value) == (
        "BatchNorm 'bn': argument `adjustment` must be None or a callable taking the "
        "input's shape and returning (scale, bias); received adjustment=(1.0, 0.0) of "
        "type tuple.")


@pytest.mark.parametrize("pair, error, message", [
    ((tf.ones(2), 0.0), ValueError,
     "argument `adjustment` must return a scale of shape (3,), (1,) or () (one value per "
     "channel, or one for all); received a scale of shape (2,)."),
    ((1.0, tf.zeros((4, 3))), ValueError,
     "argument `adjustment` must return a bias of shape (3,), (1,) or () (one value per "
     "channel, or one for all); received a bias of shape (4, 3)."),
    ((1.0, 0.0, 0.0), TypeError,
     "argument `adjustment` must return a pair (scale, bias), each of shape (3,), (1,) "
     "or (); received (1.0, 0.0, 0.0)."),
    ((tf.ones(3, tf.int32), 0.0), TypeError,
     "argument `adjustment` must return a floating-point scale; received dtype int32."),
])
def test_a_wrong_adjustment_output_is_refused_and_changes_nothing(pair, error, message):
    layer = BatchNorm(adjustment=lambda shape: pair, name="bn")
    layer.build((None, 3))
    with pytest.raises(error) as info:
        layer(np.ones((4, 3), np.float32), training=True)
    # Keras wraps an error raised in call(); the message is whole inside.
    assert f"BatchNorm 'bn': {message}" in str(info.value)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))


def test_a_wrong_size_known_only_at_run_time_is_an_error_there():
    layer = BatchNorm(adjustment=lambda shape: (tf.ones(shape[:1]), 0.0), name="bn")
    layer.build((None, 3))
    step = tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    step(np.ones((1, 3), np.float32))  # one value for all: broadcast
    with pytest.raises(tf.errors.InvalidArgumentError):
        step(np.ones((2, 3), np.float32))


# --- config, saving, export ------------------------------------------------------


def test_config_lists_adjustment_and_from_config_restores_it():
    assert BatchNorm().get_config()["adjustment"] is None
    layer = BatchNorm(adjustment=channel_ramp, name="bn")
    config = layer.get_config()
    assert config["adjustment"] == keras.saving.serialize_keras_object(channel_ramp)
    assert config["adjustment"]["config"] == "keras_bn_tests>channel_ramp"
    clone = BatchNorm.from_config(config)
    assert clone.adjustment is channel_ramp
    assert clone.get_config() == config


def test_keras_file_round_trip_with_a_registered_function(tmp_path):
    model = keras.Sequential([keras.Input((3,)), BatchNorm(adjustment=channel_ramp, name="bn")])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")  # no custom_objects
    assert loaded.layers[0].adjustment is channel_ramp
    assert loaded.layers[0].get_config() == model.layers[0].get_config()
    x = np.random.RandomState(10).normal(1.0, 2.0, (4, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=True), model(x, training=True))
    np.testing.assert_array_equal(loaded.layers[0].moving_mean.numpy(),
                                  model.layers[0].moving_mean.numpy())


def test_keras_file_with_a_lambda_needs_safe_mode_false(tmp_path):
    # Keras's rules: the lambda's code is saved (with a warning), and loading
    # it is refused unless safe_mode=False. Only its code: a name it uses
    # from its module (`tf`) would be undefined after loading.
    model = keras.Sequential([keras.Input((3,)),
                              BatchNorm(adjustment=lambda shape: (1.5, -0.25))])
    with pytest.warns(UserWarning, match="lambda"):
        model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match="safe_mode=False"):
        keras.saving.load_model(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=False)
    x = np.random.RandomState(11).normal(1.0, 2.0, (4, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=True), model(x, training=True))


@pytest.mark.slow
def test_export_serves_inference_without_the_adjustment(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    x = BatchNorm(adjustment=channel_ramp, name="bn")(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = randomize_batch_norms(keras.Model(inputs, outputs))
    model.export(str(tmp_path / "export"), verbose=False)
    x = images(3)
    (served,) = serve_without_keras_bn(tmp_path, [str(tmp_path / "export")], {"x": x})
    # The served graph is the float32 graph `predict` runs, which Grappler
    # may fuse differently: a few ulps of O(1) outputs.
    np.testing.assert_allclose(served["x"], model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
