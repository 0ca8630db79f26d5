"""The BatchNorm layer's own contract: weights, modes, updates, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from tests.reference import np_batch_norm
from tests.reference import random_params

# The core suite runs on both paths: the fused kernel and plain TF ops.
pytestmark = pytest.mark.usefixtures("both_paths")

F32_TOL = 1e-5  # see tests/test_ops.py


def _layer_with_params(channels, axis=-1, seed=0, **kwargs):
    layer = BatchNorm(axis=axis, **kwargs)
    layer.build(_shape_for(axis, channels))
    params = random_params(channels, seed)
    layer.set_weights([p.astype(np.float32) for p in params])
    return layer, params


def _shape_for(axis, channels):
    shape = [2, 3, 3, 3]
    shape[axis] = channels
    return tuple(shape)


# --- weights -------------------------------------------------------------


def test_weights_names_order_dtypes_and_trainability():
    layer = BatchNorm()
    layer.build((None, 4))
    assert [w.name for w in layer.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.trainable for w in layer.weights] == [True, True, False, False]
    assert all(tuple(w.shape) == (4,) for w in layer.weights)
    np.testing.assert_array_equal(layer.gamma.numpy(), np.ones(4))
    np.testing.assert_array_equal(layer.beta.numpy(), np.zeros(4))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(4))


def test_center_and_scale_false_create_no_beta_or_gamma():
    layer = BatchNorm(center=False, scale=False)
    layer.build((None, 3))
    assert layer.gamma is None and layer.beta is None
    assert [w.name for w in layer.weights] == ["moving_mean", "moving_variance"]
    x = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 3.0]], np.float32)
    want, _, _ = np_batch_norm(x, None, None, np.zeros(3), np.ones(3), training=True)
    np.testing.assert_allclose(layer(x, training=True), want, atol=F32_TOL)


def test_constructor_arguments_are_attributes():
    layer = BatchNorm(axis=1, momentum=0.7, epsilon=1e-3, center=False,
                      scale=False, gamma_regularizer="l2")
    assert (layer.axis, layer.momentum, layer.epsilon) == (1, 0.7, 1e-3)
    assert (layer.center, layer.scale) == (False, False)
    assert isinstance(layer.gamma_regularizer, keras.regularizers.L2)


def test_initializers_regularizers_and_constraints_are_used():
    layer = BatchNorm(
        gamma_initializer=keras.initializers.Constant(2.0),
        beta_initializer=keras.initializers.Constant(-1.0),
        moving_mean_initializer=keras.initializers.Constant(0.5),
        moving_variance_initializer=keras.initializers.Constant(3.0),
        gamma_regularizer=keras.regularizers.L2(0.5),
        beta_regularizer=keras.regularizers.L1(0.25),
        gamma_constraint=keras.constraints.NonNeg(),
    )
    layer.build((None, 2))
    np.testing.assert_array_equal(
        layer.get_weights(), [[2.0, 2.0], [-1.0, -1.0], [0.5, 0.5], [3.0, 3.0]])
    # L2(0.5) * (2^2 + 2^2) = 4 and L1(0.25) * (1 + 1) = 0.5.
    np.testing.assert_allclose(sorted(float(v) for v in layer.losses), [0.5, 4.0])
    assert layer.gamma.constraint is layer.gamma_constraint


# --- training and inference ---------------------------------------------


@pytest.mark.parametrize("shape,axis", [((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1)])
def test_conv2d_output_training_matches_reference(shape, axis):
    # The headline case of the core issue: float32 Conv2D output (8, 5, 5, 6)
    # in training mode, NHWC and NCHW, against the float64 reference.
    layer, params = _layer_with_params(6, axis)
    x = np.random.RandomState(1).normal(0.3, 1.7, shape)
    want = np_batch_norm(x, *params, training=True, axis=axis)
    y = layer(x.astype(np.float32), training=True)
    np.testing.assert_allclose(y, want[0], rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_mean, want[1], rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, want[2], rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("training", [False, None])
def test_inference_uses_moving_stats_and_updates_nothing(training):
    layer, params = _layer_with_params(6)
    x = np.random.RandomState(2).normal(0.0, 2.0, (4, 3, 3, 6))
    want, _, _ = np_batch_norm(x, *params, training=False)
    y = layer(x.astype(np.float32), training=training)
    np.testing.assert_allclose(y, want, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), params[2].astype(np.float32))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), params[3].astype(np.float32))


def test_each_training_call_updates_exactly_once():
    layer = BatchNorm(momentum=0.5, epsilon=3.0)
    x = np.array([[1.0], [3.0]], np.float32)  # mean 2, var 1
    layer(x, training=True)
    np.testing.assert_array_equal([layer.moving_mean[0], layer.moving_variance[0]], [1.0, 1.0])
    layer(x, training=True)
    np.testing.assert_array_equal([layer.moving_mean[0], layer.moving_variance[0]], [1.5, 1.0])


def test_trainable_false_runs_inference_even_when_training_true():
    layer, params = _layer_with_params(3)
    layer.trainable = False
    x = np.random.RandomState(3).normal(1.0, 2.0, (5, 3))
    want, _, _ = np_batch_norm(x, *params, training=False)
    y = layer(x.astype(np.float32), training=True)
    np.testing.assert_allclose(y, want, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), params[2].astype(np.float32))


def test_any_rank_with_the_built_channel_count():
    # Only the channel size is fixed at build time, so one layer serves
    # (N, C), (N, L, C) and (N, H, W, C) inputs with C on the last axis.
    layer = BatchNorm(momentum=0.0)
    for shape in [(4, 3), (2, 5, 3), (2, 2, 2, 3), (2, 1, 2, 2, 3)]:
        x = np.random.RandomState(len(shape)).normal(0.0, 1.0, shape)
        want = np_batch_norm(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3),
                             training=True, momentum=0.0)
        np.testing.assert_allclose(layer(x.astype(np.float32), training=True), want[0],
                                   atol=F32_TOL)
        np.testing.assert_allclose(layer.moving_variance, want[2], rtol=F32_TOL)


def test_integer_input_is_cast_to_compute_dtype():
    layer = BatchNorm(epsilon=3.0)
    y = layer(tf.constant([[1], [3]], tf.int32), training=True)
    assert y.dtype == tf.float32
    np.testing.assert_array_equal(y, [[-0.5], [0.5]])


def test_compute_output_shape():
    assert BatchNorm().compute_output_shape((None, 7, 3)) == (None, 7, 3)


# --- config --------------------------------------------------------------


def test_get_config_from_config_round_trips_every_argument():
    layer = BatchNorm(
        axis=1, momentum=0.7, epsilon=2e-3, center=False, scale=True,
        beta_initializer="ones", gamma_initializer=keras.initializers.Constant(3.0),
        moving_mean_initializer="ones", moving_variance_initializer="zeros",
        beta_regularizer="l1", gamma_regularizer=keras.regularizers.L2(0.1),
        beta_constraint="non_neg", gamma_constraint=keras.constraints.MaxNorm(2.0),
        name="bn7",
    )
    config = layer.get_config()
    for key in ["axis", "momentum", "epsilon", "center", "scale",
                "beta_initializer", "gamma_initializer", "moving_mean_initializer",
                "moving_variance_initializer", "beta_regularizer",
                "gamma_regularizer", "beta_constraint", "gamma_constraint"]:
        assert key in config, key
    clone = BatchNorm.from_config(config)
    assert clone.get_config() == config
    assert clone.name == "bn7"
    assert clone.gamma_initializer.value == 3.0
    assert clone.gamma_regularizer.l2 == pytest.approx(0.1)
    assert clone.gamma_constraint.max_value == 2.0


def test_registered_serializable_under_package_name():
    assert keras.saving.get_registered_name(BatchNorm) == "keras_bn>BatchNorm"
    assert keras.saving.get_registered_object("keras_bn>BatchNorm") is BatchNorm


# --- errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"momentum": 1.01}, ValueError,
         "BatchNorm 'bn': argument `momentum` must be a number in [0, 1]; received momentum=1.01."),
        ({"momentum": -1}, ValueError,
         "BatchNorm 'bn': argument `momentum` must be a number in [0, 1]; received momentum=-1."),
        ({"epsilon": 0}, ValueError,
         "BatchNorm 'bn': argument `epsilon` must be a finite number > 0; received epsilon=0."),
        ({"epsilon": -1e-5}, ValueError,
         "BatchNorm 'bn': argument `epsilon` must be a finite number > 0; received epsilon=-1e-05."),
        ({"axis": 1.5}, TypeError,
         "BatchNorm 'bn': argument `axis` must be an integer or a list of integers; received "
         "axis=1.5 of type float."),
        ({"momentum": "0.9"}, TypeError,
         "BatchNorm 'bn': argument `momentum` must be a number in [0, 1]; received "
         "momentum='0.9' of type str."),
    ],
)
def test_constructor_errors(kwargs, error, message):
    # TypeError for a value of the wrong type, ValueError for a wrong value.
    with pytest.raises(error) as info:
        BatchNorm(name="bn", **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "axis,shape,message",
    [
        (-1, (None,),
         "BatchNorm 'bn': expected an input of rank >= 2 (batch and channels); received rank 1."),
        (3, (None, 4, 4),
         "BatchNorm 'bn': argument `axis` must be in [-3, 3) for an input of rank 3; received axis=3."),
        (-1, (None, 4, None),
         "BatchNorm 'bn': the channel dimension (axis -1) of the input must be known at build "
         "time; received input shape (None, 4, None)."),
    ],
)
def test_build_errors(axis, shape, message):
    with pytest.raises(ValueError) as info:
        BatchNorm(axis=axis, name="bn").build(shape)
    assert str(info.value) == message


def test_channel_mismatch_error_names_layer_expected_and_received():
    layer = BatchNorm(name="bn_a")
    layer(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError) as info:
        layer(np.zeros((2, 5), np.float32), training=True)
    # Keras wraps errors raised inside call() with the layer's call context;
    # the whole of our message is in there.
    assert (
        "BatchNorm 'bn_a' was built for 4 channels on axis -1; received an "
        "input with 5 channels (shape (2, 5))."
    ) in str(info.value)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))


def test_string_input_error():
    layer = BatchNorm(name="bn_s")
    layer.build((None, 2))
    with pytest.raises(TypeError) as info:
        layer.call(tf.constant([["a", "b"]]))
    assert str(info.value) == (
        "BatchNorm 'bn_s': expected a real-valued (float, integer or bool) input tensor; received dtype string.")


# --- the op and the layer are one function ---------------------------------


def test_op_and_layer_agree_over_batches_including_bad_ones():
    # The same batches through keras_bn.batch_norm and BatchNorm: outputs
    # and moving statistics equal, a NaN batch and an empty one included
    # (both leave the statistics as they were).
    import keras_bn

    layer = BatchNorm(momentum=0.8)
    layer.build((None, 3))
    gamma, beta, mean, var = (p.astype(np.float32) for p in random_params(3))
    layer.set_weights([gamma, beta, mean, var])
    rng = np.random.RandomState(5)
    nan_batch = rng.normal(0.0, 1.0, (4, 3)).astype(np.float32)
    nan_batch[1, 2] = np.nan
    batches = [rng.normal(1.0, 2.0, (6, 3)).astype(np.float32), nan_batch,
               np.zeros((0, 3), np.float32), rng.normal(-1.0, 0.5, (5, 3)).astype(np.float32)]
    for x in batches:
        y_op, mean, var = keras_bn.batch_norm(
            x, gamma, beta, mean, var, training=True, momentum=0.8)
        y_layer = layer(x, training=True)
        np.testing.assert_array_equal(np.isnan(y_op), np.isnan(y_layer))
        np.testing.assert_allclose(y_op, y_layer, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mean, layer.moving_mean.numpy())
        np.testing.assert_array_equal(var, layer.moving_variance.numpy())
    assert np.isfinite(mean).all() and layer.refused_batches == 2


# --- PyTorch's running-statistics modes ------------------------------------


def test_track_running_stats_false_uses_batch_statistics_always():
    layer = BatchNorm(track_running_stats=False)
    layer.build((None, 3))
    assert [w.name for w in layer.weights] == ["gamma", "beta"]
    x = np.random.RandomState(6).normal(2.0, 3.0, (8, 3)).astype(np.float32)
    want, _, _ = np_batch_norm(x, None, None, np.zeros(3), np.ones(3), training=True)
    for training in (True, False, None):
        np.testing.assert_allclose(layer(x, training=training), want, rtol=1e-5, atol=1e-5)
    assert layer.get_config()["track_running_stats"] is False


def test_reset_running_stats_restores_the_initializers():
    layer = BatchNorm(momentum=None, moving_variance_initializer="zeros")
    layer.build((None, 2))
    layer(np.array([[1.0, 2.0], [3.0, 5.0]], np.float32), training=True)
    gamma = layer.gamma.numpy() + 1.0
    layer.gamma.assign(gamma)
    layer.reset_running_stats()
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), [0.0, 0.0])
    assert int(layer.num_batches_tracked.numpy()) == 0
    np.testing.assert_array_equal(layer.gamma.numpy(), gamma)  # trainable: untouched


def test_reset_running_stats_with_renorm():
    layer = BatchNorm(renorm=True)
    layer.build((None, 2))
    layer(np.array([[1.0, 2.0], [3.0, 5.0]], np.float32), training=True)
    layer.reset_running_stats()
    fresh = BatchNorm(renorm=True)
    fresh.build((None, 2))
    for a, b in zip(layer.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)


# --- a tf.function `call` in a subclassed model ----------------------------


class _FunctionModel(keras.Model):
    def __init__(self, layer):
        super().__init__()
        self.bn = layer

    @tf.function
    def call(self, x, training=None):
        return self.bn(x, training=training)


def test_subclassed_model_with_a_tf_function_call_works_as_with_keras():
    # It crashed on every call ("SelectV2 ... is out of scope") while the
    # layer created a raw tf.Variable in build. Keras reuses the trace of
    # its symbolic build pass for such a `call`, for its own layer too, so
    # the fair test is: same outputs as Keras's layer, no error, 4 weights.
    x = tf.constant([[1.0], [5.0], [3.0]])
    ours = _FunctionModel(BatchNorm(momentum=0.5, epsilon=1e-3))
    theirs = _FunctionModel(keras.layers.BatchNormalization(momentum=0.5))
    for training in (True, False):
        np.testing.assert_allclose(ours(x, training=training), theirs(x, training=training),
                                   rtol=1e-6, atol=1e-6)
    assert len(ours.bn.get_weights()) == 4
    assert not any(isinstance(v, tf.Variable) for v in vars(ours.bn).values())


def test_layer_built_inside_a_tf_function_trains():
    # The layer itself may be built while a tf.function traces (no symbolic
    # pass): its weights, the guard's counter included, are created once and
    # the moving statistics follow the batches.
    layer = BatchNorm(momentum=0.5)

    @tf.function
    def step(x):
        return layer(x, training=True)

    x = tf.constant([[1.0], [5.0]])
    step(x)
    step(x)
    np.testing.assert_allclose(layer.moving_mean.numpy(), [2.25])
    assert layer.refused_batches == 0 and len(layer.get_weights()) == 4


# --- conflicts caught at construction --------------------------------------


@pytest.mark.parametrize("kwargs, name, value", [
    ({"renorm": True}, "renorm", "True"),
    ({"virtual_batch_size": 4}, "virtual_batch_size", "4"),
    ({"synchronized": True}, "synchronized", "True"),
])
def test_fused_true_conflicts_are_caught_in_the_constructor(kwargs, name, value):
    with pytest.raises(ValueError) as info:
        BatchNorm(fused=True, name="bn", **kwargs)
    assert str(info.value) == (
        f"BatchNorm 'bn': argument `{name}` needs the TF-ops path, but fused=True "
        f"requires TensorFlow's fused kernel; received {name}={value} with fused=True. "
        "Pass fused=None (the default) or False.")


def test_fused_true_with_a_mask_fails_at_the_call_and_changes_nothing():
    layer = BatchNorm(fused=True, name="bn")
    layer.build((None, 4, 3))
    with pytest.raises(ValueError) as info:
        layer(np.ones((2, 4, 3), np.float32), training=True, mask=np.ones((2, 4), bool))
    assert ("BatchNorm 'bn': argument `mask` needs the TF-ops path, but fused=True "
            "requires TensorFlow's fused kernel; received a mask with fused=True. Pass "
            "fused=None (the default) or False.") in str(info.value)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))


def test_skipped_updates_is_the_old_name_of_refused_batches():
    # 0.1.0 called the guard's counter `skipped_updates`; it still answers.
    layer = BatchNorm()
    layer.build((None, 2))
    layer(np.full((3, 2), np.nan, np.float32), training=True)
    assert layer.refused_batches == layer.skipped_updates == 1
