"""Training statistics exact at any offset.

Float32 data whose channels sit on large means (offset x 1..2) with small
standard deviations (0.1..1), compared with float64 statistics of the same
float32 values: what users' reports of batch norm going NaN or not
converging at large activations come down to. momentum=0, so the moving
statistics are the batch's own. Every path: eager, graph, XLA, `fit`
with an unknown batch size; ranks 2-5, channels first and last; ghost
batches, masks, replicas, renorm and half precision.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from tests.reference import penalty_gradient

OFFSETS = [1e4, 1e6]
# The bound the statistics are held to: 1e-4 of the variance. The TF-ops
# path measures 1e-7..7e-6 up to 1e6 (docs/numerics.md); the fused kernel,
# which sums at most 2048 values per channel at once, within 1.3e-5 up to
# 2^20 values per channel (benchmarks/kernel_accuracy.py).
VAR_RTOL = 1e-4
# The float64 mean of float32 values at 2e6 is itself only represented in
# float32 to half its last place, 0.125: a relative 1e-7 of the mean.
MEAN_RTOL = 2e-7
# Normalized outputs are within 5 in magnitude, and a variance off by a
# relative d scales them by d / 2: with d <= 1e-5 (what TF ops measure here,
# the unstaged sum over 4096 values of an unknown batch included) that is
# 2.5e-5, plus float32 rounding of y itself.
Y_ATOL = 5e-5


def _offset_data(shape, axis, offset, std=(0.1, 1.0), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    per_channel = [1] * len(shape)
    per_channel[axis] = channels
    means = offset * np.linspace(1.0, 2.0, channels).reshape(per_channel)
    stds = np.linspace(*std, channels).reshape(per_channel)
    return (means + stds * rng.standard_normal(shape)).astype(dtype)


def _reduced(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


def _float64_batch_norm(x, axis, epsilon=1e-5):
    """(y, mean, variance) of float32 values, computed in float64."""
    x = np.asarray(x, np.float64)
    axes = _reduced(x, axis)
    mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon), mean.ravel(), var.ravel()


def _assert_statistics(layer, mean, var, var_rtol=VAR_RTOL):
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=var_rtol)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=MEAN_RTOL)


def _call(layer, x, mode):
    if mode == "eager":
        return layer(x, training=True)
    spec = tf.TensorSpec((None,) + x.shape[1:], x.dtype) if mode.endswith("unknown") else None
    fn = tf.function(lambda t: layer(t, training=True), jit_compile=mode.startswith("xla"),
                     input_signature=None if spec is None else [spec])
    return fn(x)


CASES = {
    "dense": ((256, 6), -1),
    "nhwc": ((8, 6, 6, 5), -1),
    "nchw": ((8, 5, 6, 6), 1),
    "rank3": ((16, 12, 5), -1),
    "rank5": ((4, 3, 4, 4, 5), -1),
    "rank5_channels_first": ((4, 5, 3, 4, 4), 1),
    "long_axis": ((4096, 3), -1),
}


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("mode", ["eager", "graph", "xla", "graph_unknown", "xla_unknown"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_statistics_and_output_exact_at_an_offset(case, mode, offset, both_paths):
    shape, axis = CASES[case]
    x = _offset_data(shape, axis, offset)
    layer = BatchNorm(axis=axis, momentum=0.0)
    y = _call(layer, x, mode)
    want_y, mean, var = _float64_batch_norm(x, axis)
    _assert_statistics(layer, mean, var)
    np.testing.assert_allclose(y.numpy(), want_y, atol=Y_ATOL)


@pytest.mark.parametrize("mode", ["graph", "xla"])
@pytest.mark.parametrize("case", ["dense", "nhwc", "long_axis"])
def test_exact_when_the_first_rows_lie_apart(case, mode):
    # Sorted data: the first rows (what a sample shift reads) sit 3 std
    # above the rest, and one row is 10 std below; the statistics still
    # hold the bound.
    shape, axis = CASES[case]
    x = np.sort(_offset_data(shape, axis, 1e6), axis=0)[::-1].copy()
    x[-1] -= 10 * np.linspace(0.1, 1.0, shape[axis]).astype(np.float32)
    layer = BatchNorm(axis=axis, momentum=0.0)
    y = _call(layer, x, mode)
    want_y, mean, var = _float64_batch_norm(x, axis)
    _assert_statistics(layer, mean, var)
    np.testing.assert_allclose(y.numpy(), want_y, atol=Y_ATOL)


@pytest.mark.parametrize("policy,shape,bad", [
    ("float32", (4096, 3), "nan"), ("mixed_bfloat16", (8, 3), "nan"),
    ("mixed_bfloat16", (0, 3), "empty")])
def test_sample_mean_route_under_xla_refuses_bad_batches(policy, shape, bad):
    # Under XLA one long axis and half precision take the sums about a
    # sample mean: a NaN or empty batch there (an empty sample's mean is
    # NaN too) must still leave the moving statistics as they were.
    x = np.ones(shape, np.float32)
    if bad == "nan":
        x[shape[0] // 2, 1] = np.nan
    layer = BatchNorm(momentum=0.0, dtype=policy)
    layer.build(shape)
    before = [w.numpy().copy() for w in (layer.moving_mean, layer.moving_variance)]
    y = tf.function(lambda t: layer(t, training=True), jit_compile=True)(x)
    assert y.shape == shape
    assert layer.refused_batches == 1
    for w, old in zip((layer.moving_mean, layer.moving_variance), before):
        np.testing.assert_array_equal(w.numpy(), old)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("case", ["dense", "nhwc", "nchw"])
def test_fit_with_unknown_batch_size_exact_at_1e6(case, jit_compile):
    shape, axis = CASES[case]
    x = _offset_data(shape, axis, 1e6)
    layer = BatchNorm(axis=axis, momentum=0.0)
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=jit_compile)
    model.fit(x, np.zeros_like(x), batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    _, mean, var = _float64_batch_norm(x, axis)
    _assert_statistics(layer, mean, var)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_ghost_batches_exact_at_1e6(mode):
    x = _offset_data((32, 4), -1, 1e6)
    layer = BatchNorm(momentum=0.0, virtual_batch_size=8)
    y = _call(layer, x, mode)
    groups = [_float64_batch_norm(g, -1) for g in np.split(x, 4)]
    np.testing.assert_allclose(y.numpy(), np.concatenate([g[0] for g in groups]), atol=Y_ATOL)
    _assert_statistics(layer, np.mean([g[1] for g in groups], 0),
                       np.mean([g[2] for g in groups], 0))


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_masked_statistics_exact_at_1e6(mode):
    x = _offset_data((8, 10, 4), -1, 1e6)
    mask = np.random.default_rng(1).random((8, 10)) > 0.3
    mask[0, 0] = False  # the first position is padding, as with pre-padding
    x[~mask] = 0.0
    layer = BatchNorm(momentum=0.0)
    if mode == "eager":
        y = layer(x, training=True, mask=tf.constant(mask))
    else:
        y = tf.function(lambda t, m: layer(t, training=True, mask=m),
                        jit_compile=mode == "xla")(x, tf.constant(mask))
    kept = x[mask].astype(np.float64)
    mean, var = kept.mean(0), kept.var(0)
    _assert_statistics(layer, mean, var)
    np.testing.assert_allclose(y.numpy()[mask], (kept - mean) / np.sqrt(var + 1e-5), atol=Y_ATOL)


def test_renorm_moving_variance_exact_at_1e6():
    x = _offset_data((64, 5), -1, 1e6)
    layer = BatchNorm(momentum=0.0, renorm=True)
    layer(x, training=True)
    _, mean, var = _float64_batch_norm(x, -1)
    # moving_variance = moving_stddev**2 - epsilon, from a float32 stddev.
    _assert_statistics(layer, mean, var, var_rtol=2e-4)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("policy,offset", [("mixed_float16", 1e3), ("mixed_bfloat16", 1e2)])
def test_half_precision_statistics_exact_at_an_offset(policy, offset, jit_compile):
    # Offsets the half type still resolves at std 0.5..1 (float16's last
    # place at 2e3 is 1, bfloat16's at 200 is 1); the reference is float64
    # statistics of the very half-precision values the layer sees.
    keras.mixed_precision.set_global_policy(policy)
    dtype = tf.float16 if policy == "mixed_float16" else tf.bfloat16
    x = tf.cast(_offset_data((64, 6, 6, 4), -1, offset, std=(0.5, 1.0)), dtype)
    layer = BatchNorm(momentum=0.0)
    tf.function(lambda t: layer(t, training=True), jit_compile=jit_compile)(x)
    _, mean, var = _float64_batch_norm(tf.cast(x, tf.float64).numpy(), -1)
    _assert_statistics(layer, mean, var)


@pytest.mark.parametrize("synchronized", [True, False])
@pytest.mark.parametrize("n", [16, 13, 1])
def test_replicas_exact_at_1e6(strategy, synchronized, n):
    # 13 examples: 7 and 6 per replica; 1: one replica is empty.
    x = _offset_data((n, 4), -1, 1e6)
    with strategy.scope():
        layer = BatchNorm(momentum=0.0, synchronized=synchronized)
        layer.build((None, 4))
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(n)
    xs = next(iter(strategy.experimental_distribute_dataset(dataset)))
    tf.function(lambda xs: strategy.run(lambda t: layer(t, training=True), args=(xs,)))(xs)
    parts = [p.numpy().astype(np.float64) for p in strategy.experimental_local_results(xs)]
    if synchronized:
        mean, var = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    else:
        kept = [p for p in parts if len(p)]
        counts = np.array([len(p) for p in kept])[:, None]
        mean = (counts * [p.mean(0) for p in kept]).sum(0) / counts.sum()
        var = (counts * [p.var(0) for p in kept]).sum(0) / counts.sum()
    if n == 1:
        var = np.zeros(4)  # one value per channel: the variance is 0
        np.testing.assert_array_equal(layer.moving_variance.value.values[0].numpy(), var)
    else:
        for value in layer.moving_variance.value.values:
            np.testing.assert_allclose(value.numpy(), var, rtol=VAR_RTOL)
    for value in layer.moving_mean.value.values:
        np.testing.assert_allclose(value.numpy(), mean, rtol=MEAN_RTOL)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("case", ["dense", "nchw"])
def test_input_gradient_exact_at_1e4(case, mode):
    # dx = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
    # in float64 from the same float32 x: the TF-ops backward pass works
    # from the shifted input too.
    shape, axis = CASES[case]
    x = tf.constant(_offset_data(shape, axis, 1e4))
    dy = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    layer = BatchNorm(axis=axis, fused=False)

    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x, output_gradients=dy)

    got = grad(x) if mode == "eager" else tf.function(grad, jit_compile=True)(x)
    x_hat, _, var = _float64_batch_norm(x.numpy(), axis)
    axes = _reduced(x_hat, axis)
    dy64 = dy.astype(np.float64)
    shape_c = [1] * len(shape)
    shape_c[axis % len(shape)] = -1
    want = (dy64 - dy64.mean(axes, keepdims=True)
            - x_hat * (dy64 * x_hat).mean(axes, keepdims=True)) / np.sqrt(
                var.reshape(shape_c) + 1e-5)
    # dx is O(1 / sigma) <= 10: float32 rounding of O(10) values.
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4 * np.abs(want).max())


# --- inference -------------------------------------------------------------

def _with_statistics_of(x, axis):
    """A built layer whose moving statistics are x's own, and the float64
    output for them (from the float32 values the layer holds)."""
    axes = _reduced(x, axis)
    x64 = np.asarray(x, np.float64)
    layer = BatchNorm(axis=axis)
    layer.build(x.shape)
    layer.moving_mean.assign(x64.mean(axes).astype(np.float32))
    layer.moving_variance.assign(x64.var(axes).astype(np.float32))
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    mean = layer.moving_mean.numpy().astype(np.float64).reshape(shape)
    var = layer.moving_variance.numpy().astype(np.float64).reshape(shape)
    return layer, (x64 - mean) / np.sqrt(var + 1e-5)


# Outputs O(1) from x - mean, exact for x near the mean: float32 rounding
# of the O(1) product, 1e-5 absolute as the bound.
INFERENCE_ATOL = 1e-5


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_inference_exact_at_1e4_eagerly_and_under_xla(case, mode):
    # Nothing converts these calls: batch norm is centred first everywhere.
    shape, axis = CASES[case]
    x = _offset_data(shape, axis, 1e4, std=(1.0, 1.0))
    layer, want = _with_statistics_of(x, axis)
    fn = lambda t: layer(t, training=False)  # noqa: E731
    y = fn(x) if mode == "eager" else tf.function(fn, jit_compile=True)(x)
    np.testing.assert_allclose(y.numpy(), want, atol=INFERENCE_ATOL)


def test_inference_exact_at_1e4_in_a_graph_channels_last_4d():
    x = _offset_data((8, 6, 6, 5), -1, 1e4, std=(1.0, 1.0))
    layer, want = _with_statistics_of(x, -1)
    y = tf.function(lambda t: layer(t, training=False))(x)
    np.testing.assert_allclose(y.numpy(), want, atol=INFERENCE_ATOL)


@pytest.mark.parametrize("kind", ["Conv2D", "DepthwiseConv2D"])
def test_inference_after_a_convolution_with_a_large_bias_is_exact(kind):
    # In a graph the batch norm joins the convolution (keras_bn.backend.tensorflow.conv_fold)
    # and sees its output before the bias: exact against float64 even
    # where the float32 conv output itself (at 1e4) is not.
    keras.utils.set_random_seed(0)
    bias_init = keras.initializers.Constant(1e4)
    if kind == "Conv2D":
        conv = keras.layers.Conv2D(4, 3, bias_initializer=bias_init)
    else:
        conv = keras.layers.DepthwiseConv2D(3, bias_initializer=bias_init)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float32)
    conv.build(x.shape)
    kernel, bias = (w.numpy().astype(np.float64) for w in conv.weights)
    if kind == "Conv2D":
        z = tf.nn.conv2d(x.astype(np.float64), kernel, 1, "VALID").numpy() + bias
    else:
        z = tf.nn.depthwise_conv2d(x.astype(np.float64), kernel, [1, 1, 1, 1],
                                   "VALID").numpy() + bias
    layer, _ = _with_statistics_of(z.astype(np.float32), -1)
    mean = layer.moving_mean.numpy().astype(np.float64)
    want = (z - mean) / np.sqrt(layer.moving_variance.numpy().astype(np.float64) + 1e-5)
    y = tf.function(lambda t: layer(conv(t), training=False))(x)
    np.testing.assert_allclose(y.numpy(), want, atol=INFERENCE_ATOL)


@pytest.mark.parametrize("case", ["dense", "nchw", "rank3", "rank5"])
def test_foldable_inference_in_a_graph_stays_within_its_bound(case):
    # A traced call outside XLA may be served and converted: the x * a + b
    # form TFLite folds into the layer before it. Its error is the rounding
    # of x * a at the offset's magnitude, cancelled by + b: at most about
    # two float32 ulps of max |x * a| (docs/numerics.md, measured 1.4e-3 to
    # 1.9e-3 at offset 1e4, std 1).
    shape, axis = CASES[case]
    x = _offset_data(shape, axis, 1e4, std=(1.0, 1.0))
    layer, want = _with_statistics_of(x, axis)
    y = tf.function(lambda t: layer(t, training=False))(x)
    scale = 1.0 / np.sqrt(layer.moving_variance.numpy() + 1e-5)
    bound = 2 * np.finfo(np.float32).eps * np.abs(x).max() * scale.max()
    assert np.abs(y.numpy() - want).max() <= bound


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("case", ["dense", "nchw", "long_axis"])
def test_second_order_gradients_exact_at_1e4(case, mode):
    # Batch norm doesn't change under a per-channel shift, so neither do its
    # gradients of any order: float32 data at offset 1e4 (where TF ops take
    # their second look, in a graph through the backward's Switch and Merge)
    # against float64 of the same values with the offset taken off exactly.
    shape, axis = CASES[case]
    x32 = _offset_data(shape, axis, 1e4)
    per_channel = [1] * len(shape)
    per_channel[axis % len(shape)] = -1
    offset = 1e4 * np.linspace(1.0, 2.0, shape[axis]).reshape(per_channel)
    v = np.random.default_rng(3).standard_normal(shape)

    def penalty(dtype, x):
        layer = BatchNorm(axis=axis, fused=False, dtype=dtype)
        layer.build(shape)
        x, dy = tf.constant(x, dtype), tf.constant(v, dtype)
        fn = lambda x: penalty_gradient(  # noqa: E731
            lambda t: layer(t, training=True), x, dy, [x, layer.gamma.value])
        if mode != "eager":
            fn = tf.function(fn, jit_compile=mode == "xla")
        return fn(x)

    got = penalty("float32", x32)
    want = penalty("float64", x32.astype(np.float64) - offset)
    for a, b in zip(got, want):
        # Second derivatives are O(1 / std^2) <= 100: float32 rounding of
        # sums over the batch, 1e-4 of the largest entry.
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4 * np.abs(b.numpy()).max())
