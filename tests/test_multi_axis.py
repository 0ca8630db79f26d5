"""BatchNorm with a list of axes: statistics per position of several axes,
as tf_keras computes them, on both kernels, with masks, ghost batches,
renorm, replicas, gradients, saving, serving, and the refusals of the
functions that take one channel axis."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn import BatchNorm
from keras_bn.backend.tensorflow import dispatch
from tests.reference import penalty_gradient

# float32 statistics and outputs of O(1) values: a few ulps.
F32_TOL = 1e-5
# tf_keras's data lie on an offset of 100 with a spread of 0.29 (the
# reference takes the float32-rounded input, so only the kernels' rounding
# counts): both paths centre such data exactly (their means are offset-
# dominated), leaving float32 rounding of O(1-10) outputs (gamma / std is
# up to 2 / 0.29 here).
OFFSET_TOL = 2e-5
# float64 on the TF-ops path against autodiff of the plain formula: the same
# terms added in another order.
F64_TOL = 1e-9


def np_multi_axis(x, gamma, beta, moving_mean, moving_var, axes, *, training,
                  momentum=0.9, epsilon=1e-5, virtual_batch_size=None):
    """Float64 batch norm per position of `axes`, from the formula.

    The parameters have the compact shape of x's sizes on the sorted axes.
    Ghost batches are consecutive examples (0..v-1, v..2v-1, ...), keras_bn's
    convention; the moving statistics follow their mean.
    """
    x = np.asarray(x, np.float64)
    axes = sorted(a % x.ndim for a in axes)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]

    def b(v):
        return np.asarray(v, np.float64).reshape(shape)

    if not training:
        y = (x - b(moving_mean)) / np.sqrt(b(moving_var) + epsilon) * b(gamma) + b(beta)
        return y, moving_mean, moving_var
    v = virtual_batch_size or x.shape[0]
    ghosts = x.reshape((-1, v) + x.shape[1:])  # [G, v, ...]: original axis i is i + 1
    reduced = tuple(i + 1 for i in range(x.ndim) if i not in axes)
    mean = ghosts.mean(reduced, keepdims=True)
    var = ghosts.var(reduced, keepdims=True)  # biased
    y = (ghosts - mean) / np.sqrt(var + epsilon) * b(gamma)[None] + b(beta)[None]
    batch_mean = mean.mean(0).reshape(np.shape(gamma))
    batch_var = var.mean(0).reshape(np.shape(gamma))
    return (y.reshape(x.shape), momentum * moving_mean + (1 - momentum) * batch_mean,
            momentum * moving_var + (1 - momentum) * batch_var)


def _params(shape, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.uniform(0.5, 2.0, shape), rng.uniform(-1.0, 1.0, shape),
            rng.uniform(-1.0, 1.0, shape), rng.uniform(0.5, 2.0, shape))


def _layer(input_shape, axis, seed=0, **kwargs):
    layer = BatchNorm(axis=axis, **kwargs)
    layer.build(input_shape)
    params = _params(layer.moving_mean.shape, seed)
    layer.set_weights([p.astype(np.float32) for p in params])
    return layer, params


def _rounded(x):
    """x as float32, and the float64 values that float32 holds."""
    x32 = np.asarray(x, np.float32)
    return x32, x32.astype(np.float64)


# --- weights -------------------------------------------------------------


def test_weights_have_the_sizes_on_the_axes_in_keras_order():
    layer = BatchNorm(axis=[2, 1])
    layer.build((None, 4, 3, 5))
    assert [w.name for w in layer.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    assert all(tuple(w.shape) == (4, 3) for w in layer.weights)
    assert layer.axis == [2, 1]


def test_a_one_entry_list_is_the_integer():
    x = np.random.RandomState(0).normal(0.0, 1.0, (2, 3, 3, 4)).astype(np.float32)
    listed, params = _layer((None, 3, 3, 4), [3])
    plain, _ = _layer((None, 3, 3, 4), 3)
    assert listed.axis == 3 and listed.get_config()["axis"] == 3
    assert tuple(listed.gamma.shape) == (4,)
    np.testing.assert_array_equal(listed(x, training=True), plain(x, training=True))
    np.testing.assert_array_equal(listed.moving_variance.numpy(), plain.moving_variance.numpy())
    np.testing.assert_array_equal(listed(x), plain(x))


# --- tf_keras's cases against the float64 reference ------------------------


@pytest.mark.parametrize("shape, axis", [
    ((5, 4, 3), [1, 2]),          # tf_keras's test3DInputMultiAxis12
    ((5, 3, 4, 4, 3), [1, 2, 3]),  # tf_keras's test5DInputMultiAxis123
])
def test_training_and_inference_match_reference(both_paths, shape, axis):
    # tf_keras's data: uniform values on an offset of 100, momentum 0.9.
    layer, params = _layer(shape, axis, momentum=0.9, epsilon=1e-3)
    x32, x = _rounded(np.random.RandomState(1).random_sample(shape) + 100)
    y, mean, var = np_multi_axis(x, *params, axis, training=True, epsilon=1e-3)
    np.testing.assert_allclose(layer(x32, training=True), y, atol=OFFSET_TOL)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-6)  # a few ulps of 10
    np.testing.assert_allclose(layer.moving_variance, var, rtol=F32_TOL)
    want, _, _ = np_multi_axis(x, params[0], params[1], mean, var, axis, training=False,
                               epsilon=1e-3)
    np.testing.assert_allclose(layer(x32), want, atol=OFFSET_TOL)


def test_ghost_batches_5d_axis_14_match_reference():
    # tf_keras's testGhostBN5DimsMultiAxis14 (smaller), over five steps. Its
    # sub-batches are strided (examples g, g + G, ...); keras_bn's are
    # consecutive, as the reference here.
    shape, v = (6, 3, 4, 4, 4), 3
    layer = BatchNorm(axis=[1, 4], momentum=0.8, epsilon=1e-3, virtual_batch_size=v,
                      beta_initializer=keras.initializers.Constant(2.0),
                      gamma_initializer=keras.initializers.Constant(3.0))
    layer.build(shape)
    gamma, beta = np.full((3, 4), 3.0), np.full((3, 4), 2.0)
    mean, var = np.zeros((3, 4)), np.ones((3, 4))
    rng = np.random.RandomState(2)
    for _ in range(5):
        x32, x = _rounded(rng.random_sample(shape))
        y, mean, var = np_multi_axis(x, gamma, beta, mean, var, [1, 4], training=True,
                                     momentum=0.8, epsilon=1e-3, virtual_batch_size=v)
        np.testing.assert_allclose(layer(x32, training=True), y, atol=F32_TOL)
        want, _, _ = np_multi_axis(x, gamma, beta, mean, var, [1, 4], training=False,
                                   epsilon=1e-3)
        np.testing.assert_allclose(layer(x32), want, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=F32_TOL, atol=F32_TOL)


def test_negative_entries_are_resolved_against_the_build_rank(both_paths):
    x = np.random.RandomState(3).normal(0.0, 1.0, (4, 2, 3, 5)).astype(np.float32)
    negative, _ = _layer(x.shape, [-1, -2])
    positive, _ = _layer(x.shape, [2, 3])
    np.testing.assert_array_equal(negative(x, training=True), positive(x, training=True))
    assert negative.get_config()["axis"] == [-1, -2]  # as given; the rank is the build's


# --- both kernels ------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [
    ((4, 3, 5), [1, 2]),        # a trailing block: [-1, 1, 1, 15] in NHWC
    ((4, 3, 5, 2), [1, 2]),     # a block before the last axis: NCHW
    ((2, 3, 4, 2, 2), [2, 3]),  # a block in the middle of rank 5
])
def test_kernel_and_tf_ops_compute_the_same(both_paths, shape, axis):
    x = np.random.RandomState(4).normal(0.5, 2.0, shape).astype(np.float32)
    chosen = dispatch.route(tf.constant(x), tuple(axis), 1e-5, training=True)
    assert chosen == (dispatch.FUSED if both_paths == "kernel" else dispatch.TF_OPS,
                      "faster here: both_paths")
    layer, params = _layer(shape, axis)
    y, mean, var = np_multi_axis(x, *params, axis, training=True)
    np.testing.assert_allclose(layer(x, training=True), y, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("axis", [[1, 2], [2, 3]])
def test_inference_on_both_paths_matches_reference(both_paths, axis):
    # 4-D, where inference may take the kernel (other ranks keep TF ops).
    x = np.random.RandomState(16).normal(0.5, 2.0, (4, 3, 5, 2)).astype(np.float32)
    chosen = dispatch.route(tf.constant(x), tuple(axis), 1e-5, training=False)
    assert chosen.kernel == (dispatch.FUSED if both_paths == "kernel" else dispatch.TF_OPS)
    layer, params = _layer(x.shape, axis)
    want, _, _ = np_multi_axis(x, *params, axis, training=False)
    np.testing.assert_allclose(layer(x), want, rtol=F32_TOL, atol=F32_TOL)


def test_axes_apart_take_tf_ops_and_the_route_says_why():
    x = tf.zeros((2, 3, 4, 5))
    assert dispatch.route(x, (1, 3), 1e-5, training=True) == (
        dispatch.TF_OPS, "the kernel takes one channel axis, or axes next to each other "
        "that a reshape makes one; received axes [1, 3]")


def test_fused_true_with_axes_apart_is_an_error():
    layer = BatchNorm(axis=[1, 3], fused=True, name="bn")
    with pytest.raises(ValueError) as info:
        layer(np.ones((2, 3, 4, 5), np.float32), training=True)
    assert ("BatchNorm 'bn': fused=True, but the kernel takes one channel axis, or axes "
            "next to each other that a reshape makes one; received axes [1, 3].") in str(info.value)


def test_axes_apart_match_reference():
    layer, params = _layer((4, 3, 2, 5), [1, 3])
    x = np.random.RandomState(5).normal(0.0, 1.0, (4, 3, 2, 5)).astype(np.float32)
    y, mean, var = np_multi_axis(x, *params, [1, 3], training=True)
    np.testing.assert_allclose(layer(x, training=True), y, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=F32_TOL, atol=F32_TOL)


def test_mixed_float16_keeps_float32_weights(both_paths):
    # float16 output: half an ulp of values up to 4 is 2e-3.
    keras.mixed_precision.set_global_policy("mixed_float16")
    x = np.random.RandomState(17).normal(0.5, 2.0, (4, 3, 5, 2))
    layer, params = _layer(x.shape, [2, 3])
    y = layer(tf.constant(x, tf.float16), training=True)
    assert y.dtype == tf.float16 and layer.moving_mean.dtype == "float32"
    want, _, _ = np_multi_axis(x.astype(np.float16), *params, [2, 3], training=True)
    np.testing.assert_allclose(y, want, atol=4e-3)


def test_fit_trains_and_updates_the_statistics():
    model = keras.Sequential([keras.Input((2, 3)), BatchNorm(axis=[1, 2], name="bn"),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.random.RandomState(18).normal(3.0, 1.0, (16, 2, 3)).astype(np.float32)
    model.fit(x, np.zeros((16, 1)), batch_size=8, epochs=1, verbose=0)
    # Two steps of momentum 0.9 towards 3: 0.57.
    assert (model.get_layer("bn").moving_mean.numpy() > 0.5).all()


# --- masks, renorm, replicas, the op ----------------------------------------


def test_mask_excludes_positions_from_the_statistics():
    # (N, T, C) with axis [1, 2]: a statistic per (t, c) over the batch; a
    # Keras mask (N, T) leaves padded steps out.
    rng = np.random.RandomState(6)
    x = rng.normal(0.0, 1.0, (6, 4, 3))
    mask = rng.rand(6, 4) > 0.3
    mask[0] = True  # every step keeps a value
    x[~mask] = 1e3  # padding that would wreck the statistics if counted
    layer, (gamma, beta, _, _) = _layer(x.shape, [1, 2], momentum=0.0)
    y = layer(x.astype(np.float32), training=True, mask=mask).numpy()
    w = mask[..., None] * np.ones(x.shape)
    mean = (w * x).sum(0) / w.sum(0)
    var = (w * (x - mean) ** 2).sum(0) / w.sum(0)
    want = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    np.testing.assert_allclose(y[mask], want[mask], rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=F32_TOL, atol=F32_TOL)


def test_renorm_matches_reference():
    # One step from the initial renorm statistics (mean 0, stddev 1) with
    # clipping that binds: r = clip(sigma, 0.8, 1.2), d = clip(mu, -0.5, 0.5).
    clipping = {"rmin": 0.8, "rmax": 1.2, "dmax": 0.5}
    layer = BatchNorm(axis=[1, 2], renorm=True, renorm_clipping=clipping)
    x = np.random.RandomState(7).normal(0.3, 1.2, (8, 2, 3))
    layer.build(x.shape)
    mean, var = x.mean(0), x.var(0)
    sigma = np.sqrt(var + 1e-5)
    r, d = np.clip(sigma, 0.8, 1.2), np.clip(mean, -0.5, 0.5)
    want = (x - mean) / sigma * r + d
    np.testing.assert_allclose(layer(x.astype(np.float32), training=True), want,
                               rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.renorm_stddev, 0.99 + 0.01 * sigma, rtol=F32_TOL)
    np.testing.assert_allclose(layer.moving_stddev, 0.9 + 0.1 * sigma, rtol=F32_TOL)
    assert all(tuple(w.shape) == (2, 3) for w in layer.weights)


def test_synchronized_equals_the_concatenated_batch(strategy):
    x = np.random.RandomState(8).normal(2.0, 3.0, (13, 2, 3)).astype(np.float32)
    with strategy.scope():
        layer, params = _layer((None, 2, 3), [1, 2], synchronized=True)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(len(x))
    xs = next(iter(strategy.experimental_distribute_dataset(ds)))  # 7 and 6 examples

    @tf.function
    def step(xs):
        return strategy.run(lambda x: layer(x, training=True), args=(xs,))

    y = np.concatenate([v.numpy() for v in strategy.experimental_local_results(step(xs))])
    want = np_multi_axis(x, *params, [1, 2], training=True)
    np.testing.assert_allclose(y, want[0], rtol=F32_TOL, atol=F32_TOL)
    for value in layer.moving_variance.value.values:
        np.testing.assert_allclose(value.numpy(), want[2], rtol=F32_TOL, atol=F32_TOL)


def test_op_and_layer_agree():
    x = np.random.RandomState(9).normal(1.0, 2.0, (5, 2, 3)).astype(np.float32)
    layer, params = _layer(x.shape, [1, 2], momentum=0.8)
    gamma, beta, mean, var = (p.astype(np.float32) for p in params)
    y, new_mean, new_var = keras_bn.batch_norm(
        x, gamma, beta, mean, var, training=True, momentum=0.8, axis=[1, 2])
    np.testing.assert_allclose(y, layer(x, training=True), rtol=1e-6, atol=1e-6)
    assert new_mean.shape == (2, 3)
    np.testing.assert_allclose(new_mean, layer.moving_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_var, layer.moving_variance, rtol=1e-6, atol=1e-6)
    y, _, _ = keras_bn.batch_norm(x, gamma, beta, new_mean, new_var, training=False,
                                  axis=[1, 2])
    np.testing.assert_allclose(y, layer(x), rtol=1e-6, atol=1e-6)


def test_op_parameter_shape_error():
    with pytest.raises(ValueError) as info:
        keras_bn.batch_norm(tf.ones([2, 2, 3]), tf.ones([6]), None, tf.zeros([2, 3]),
                            tf.ones([2, 3]), training=True, axis=[1, 2])
    assert str(info.value) == (
        "batch_norm: argument `gamma` must have shape (2, 3) to match the sizes of `x` "
        "on axis=[1, 2]; received shape (6,).")


def test_recalibrate_sets_the_population_statistics():
    model = keras.Sequential([keras.Input((2, 3)), BatchNorm(axis=[1, 2], name="bn")])
    rng = np.random.RandomState(10)
    batches = [rng.normal(1.0, 2.0, (n, 2, 3)).astype(np.float32) for n in (4, 4, 2)]
    keras_bn.recalibrate(model, batches, verbose=0)
    population = np.concatenate(batches).astype(np.float64)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean, population.mean(0), rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(bn.moving_variance, population.var(0), rtol=F32_TOL, atol=F32_TOL)


# --- gradients -------------------------------------------------------------


def _plain(x, gamma, beta, axes, virtual_batch_size=None):
    """Training-mode batch norm per position of `axes` from autodiff-able TF
    ops (tf.nn.moments), no custom gradient."""
    shape = tf.shape(x)
    xs, axes = x, list(axes)
    if virtual_batch_size is not None:
        xs = tf.reshape(x, tf.concat([[-1, virtual_batch_size], shape[1:]], 0))
        axes = [a + 1 for a in axes]
    rank = xs.shape.rank
    first = 1 if virtual_batch_size is not None else 0
    reduced = [i for i in range(first, rank) if i not in axes]
    mean, var = tf.nn.moments(xs, reduced, keepdims=True)
    bshape = [xs.shape[i] if i in axes else 1 for i in range(rank)]
    y = (xs - mean) * tf.math.rsqrt(var + 1e-5) * tf.reshape(gamma, bshape) + tf.reshape(
        beta, bshape)
    return tf.reshape(y, shape)


@pytest.mark.parametrize("shape, axis, v", [
    ((6, 2, 3), [1, 2], None),
    ((6, 2, 3, 2), [1, 3], 3),  # axes apart, with ghost batches
])
def test_second_order_matches_autodiff_of_the_formula(shape, axis, v):
    rng = np.random.RandomState(11)
    x, dy = tf.constant(rng.normal(0.5, 2.0, shape)), tf.constant(rng.normal(0.0, 1.0, shape))
    layer = BatchNorm(axis=axis, dtype="float64", virtual_batch_size=v)
    layer.build(shape)
    layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape))
    layer.beta.assign(rng.uniform(-1.0, 1.0, layer.beta.shape))
    gamma = layer.gamma.value
    got = penalty_gradient(lambda x: layer(x, training=True), x, dy, [x, gamma])
    want = penalty_gradient(lambda x: _plain(x, gamma, layer.beta, axis, v), x, dy, [x, gamma])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=F64_TOL, atol=F64_TOL)


def test_first_order_on_both_paths_matches_autodiff(both_paths):
    # The kernel's float32 gradient against float64 autodiff of the formula.
    rng = np.random.RandomState(12)
    x, dy = rng.normal(0.5, 2.0, (6, 3, 4)), rng.normal(0.0, 1.0, (6, 3, 4))
    layer, params = _layer(x.shape, [1, 2])
    x32 = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x32)
        y = layer(x32, training=True)
    got = tape.gradient(y, [x32, layer.gamma, layer.beta], output_gradients=tf.constant(
        dy, tf.float32))
    x64, gamma, beta = (tf.constant(t) for t in (x, params[0], params[1]))
    with tf.GradientTape() as tape:
        tape.watch([x64, gamma, beta])
        y = _plain(x64, gamma, beta, [1, 2])
    want = tape.gradient(y, [x64, gamma, beta], output_gradients=tf.constant(dy))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=F32_TOL, atol=F32_TOL)


# --- errors ----------------------------------------------------------------


@pytest.mark.parametrize("axis, error, message", [
    ([], ValueError,
     "BatchNorm 'bn': argument `axis` must be an integer or a non-empty list of integers; "
     "received axis=[]."),
    ([1, 2, 1], ValueError,
     "BatchNorm 'bn': argument `axis` must name each axis once; received axis=[1, 2, 1]."),
    ([1, 2.0], TypeError,
     "BatchNorm 'bn': argument `axis` must be an integer or a list of integers; received "
     "axis=[1, 2.0], whose entry 2.0 is of type float."),
    ([1, True], TypeError,
     "BatchNorm 'bn': argument `axis` must be an integer or a list of integers; received "
     "axis=[1, True], whose entry True is of type bool."),
    ("1", TypeError,
     "BatchNorm 'bn': argument `axis` must be an integer or a list of integers; received "
     "axis='1' of type str."),
])
def test_constructor_errors(axis, error, message):
    with pytest.raises(error) as info:
        BatchNorm(axis=axis, name="bn")
    assert str(info.value) == message


@pytest.mark.parametrize("axis, kwargs, shape, message", [
    ([1, 3], {}, (None, 4, 3),
     "BatchNorm 'bn': argument `axis` must hold axes in [-3, 3) for an input of rank 3; "
     "received axis=[1, 3]."),
    ([-4, 1], {}, (None, 4, 3),
     "BatchNorm 'bn': argument `axis` must hold axes in [-3, 3) for an input of rank 3; "
     "received axis=[-4, 1]."),
    ([1, -2], {}, (None, 4, 3),
     "BatchNorm 'bn': argument `axis` must name each axis once; received axis=[1, -2], which "
     "names axis 1 twice for an input of rank 3."),
    ([0, 1], {}, (None, 4),
     "BatchNorm 'bn': argument `axis` must leave an axis to compute the statistics over; "
     "received axis=[0, 1], every axis of an input of rank 2."),
    ([1, 2], {}, (None, 4, None),
     "BatchNorm 'bn': the dimensions on axis=[1, 2] of the input must be known at build "
     "time; received input shape (None, 4, None)."),
])
def test_build_errors(axis, kwargs, shape, message):
    with pytest.raises(ValueError) as info:
        BatchNorm(axis=axis, name="bn", **kwargs).build(shape)
    assert str(info.value) == message


@pytest.mark.parametrize("axis", [[0, 2], 0])
def test_the_batch_axis_with_ghost_batches_is_an_error(axis):
    # tf_keras refuses it too; with an int it used to fail inside the kernel.
    layer = BatchNorm(axis=axis, virtual_batch_size=2, name="bn")
    with pytest.raises(ValueError) as info:
        layer(np.ones((4, 3, 2), np.float32), training=True)
    assert ("BatchNorm 'bn': argument `axis` must not name the batch axis 0 with "
            f"virtual_batch_size=2, which splits that axis into ghost batches; received "
            f"axis={axis}.") in str(info.value)


def test_another_rank_at_the_call_is_an_error():
    layer = BatchNorm(axis=[-2, -1], name="bn")
    layer.build((None, 4, 3))
    with pytest.raises(ValueError) as info:
        layer(np.ones((2, 5, 4, 3), np.float32))
    assert ("BatchNorm 'bn' was built for inputs of rank 3 (axis=[-2, -1]); received an "
            "input of rank 4 (shape (2, 5, 4, 3)).") in str(info.value)


def test_other_sizes_at_the_call_are_an_error():
    layer = BatchNorm(axis=[1, 2], name="bn")
    layer.build((None, 4, 3))
    with pytest.raises(ValueError) as info:
        layer(np.ones((2, 4, 5), np.float32), training=True)
    assert ("BatchNorm 'bn' was built for sizes (4, 3) on axis=[1, 2]; received an input "
            "with sizes (4, 5) there (shape (2, 4, 5)).") in str(info.value)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros((4, 3)))


def _unknown_sizes_step(layer):
    return tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec([None, None, None])])


def test_sizes_unknown_when_traced_compute_as_eagerly(both_paths):
    x = np.random.RandomState(15).normal(1.0, 2.0, (5, 4, 3)).astype(np.float32)
    layer, _ = _layer(x.shape, [1, 2])
    twin, _ = _layer(x.shape, [1, 2])
    np.testing.assert_allclose(_unknown_sizes_step(layer)(x), twin(x, training=True),
                               rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, twin.moving_variance, rtol=F32_TOL)


def test_sizes_unknown_when_traced_are_checked_at_run_time():
    layer = BatchNorm(axis=[1, 2], name="bn")
    layer.build((None, 4, 3))
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _unknown_sizes_step(layer)(tf.ones([2, 4, 5]))
    # TensorFlow's Assert escapes quotes and shortens long messages.
    message = str(info.value).replace("\\'", "'")
    assert "BatchNorm 'bn' was built for sizes (4, 3) on axis=" in message
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros((4, 3)))


# --- config, saving, serving -------------------------------------------------


def test_get_config_from_config_round_trips():
    layer = BatchNorm(axis=(2, -3), virtual_batch_size=2, name="bn")
    config = layer.get_config()
    assert config["axis"] == [2, -3]  # a tuple comes back as a list, as JSON has it
    clone = BatchNorm.from_config(config)
    assert clone.get_config() == config


def _model():
    model = keras.Sequential([
        keras.Input((3, 4, 2)),
        keras.layers.Conv2D(2, 1, name="conv"),
        BatchNorm(axis=[1, 3], name="bn", momentum=0.5),
        keras.layers.Flatten(),
        keras.layers.Dense(2, name="head"),
    ], name="net")
    bn = model.get_layer("bn")
    bn.set_weights([p.astype(np.float32) for p in _params((3, 2), seed=13)])
    return model


def _x(n=4):
    return np.random.RandomState(14).normal(0.0, 1.0, (n, 3, 4, 2)).astype(np.float32)


def test_keras_file_round_trip_is_exact(tmp_path):
    model = _model()
    model.save(tmp_path / "net.keras")
    loaded = keras.saving.load_model(tmp_path / "net.keras")
    assert loaded.get_layer("bn").get_config() == model.get_layer("bn").get_config()
    for a, b in zip(model.get_layer("bn").weights, loaded.get_layer("bn").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded.predict(_x(), verbose=0), model.predict(_x(), verbose=0))


def test_export_serves_what_predict_computes(tmp_path):
    # A served graph is the float32 graph `predict` runs, fused by Grappler
    # perhaps otherwise: a few ulps of O(1) outputs.
    model = _model()
    model.export(str(tmp_path / "export"), verbose=False)
    serve = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
    for n in (1, 3):
        (y,) = serve(tf.constant(_x(n))).values()
        np.testing.assert_allclose(y, model.predict(_x(n), verbose=0), rtol=1e-5, atol=1e-5)


# --- what takes one channel axis only ------------------------------------------


def test_to_keras_refuses():
    with pytest.raises(ValueError) as info:
        keras_bn.to_keras(_model())
    assert str(info.value) == (
        "to_keras: BatchNorm 'bn' has no keras.layers.BatchNormalization equivalent: "
        "argument `axis` must be a single integer (Keras keeps statistics along one channel "
        "axis) there; received axis=[1, 3].")


def test_fold_batch_norms_refuses():
    with pytest.raises(ValueError) as info:
        keras_bn.fold_batch_norms(_model())
    assert str(info.value) == (
        "fold_batch_norms: argument `model` must hold batch norms with a single channel "
        "axis; received BatchNorm 'bn' with axis=[1, 3] in model 'net': its scale varies "
        "over several axes, which neither the kernel of the layer before it (scaled per "
        "output channel) nor a ChannelAffine (one channel axis) can hold.")


def test_to_torch_state_dict_refuses():
    layer, _ = _layer((None, 2, 3), [1, 2])
    with pytest.raises(ValueError) as info:
        keras_bn.to_torch_state_dict(layer, as_numpy=True)
    assert str(info.value) == (
        "to_torch_state_dict: argument `layer` must have a single channel axis, as a "
        f"PyTorch batch norm has; received {layer.name!r} with axis=[1, 2].")


def test_from_torch_refuses_several_axes_and_takes_a_one_entry_list():
    state = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3),
             "running_var": np.ones(3)}
    with pytest.raises(ValueError) as info:
        keras_bn.from_torch(state, axis=[1, 2])
    assert str(info.value) == (
        "from_torch: argument `axis` must be a single integer, as a PyTorch batch norm has "
        "one channel axis; received axis=[1, 2].")
    assert keras_bn.from_torch(state, axis=[1]).axis == 1
