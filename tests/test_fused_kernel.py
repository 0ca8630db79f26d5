"""Which path serves a call, and what only one of the paths has to get right.

The core suite (test_ops, test_layer, test_keras_parity, test_graph,
test_model) already runs every reference check on both paths through the
`both_paths` fixture; here: dispatch, no upcast copies, the kernel's
Bessel-corrected variance, its accuracy guard, its epsilon limit, XLA.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from keras_bn import batch_norm
from keras_bn.backend.tensorflow import fused_kernel as fused
from keras_bn import ops
from tests.reference import few_valued
from tests.reference import np_batch_norm
from tests.reference import random_params
from tests.reference import train_step_gradients

F32_TOL = 1e-5  # see tests/test_ops.py
# Dispatch expectations for a CPU-only machine; with a GPU, cuDNN takes every
# layout (tests/test_gpu.py checks that).
cpu_only = pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                              reason="CPU dispatch; a GPU changes the choice")


@pytest.fixture(autouse=True)
def _kernel_at_any_size(monkeypatch):
    """These tests are about what the kernel computes and which graphs it
    builds, on tiny tensors; the size rule that would send those to TF ops
    is tests/test_dispatch.py's."""
    from keras_bn.backend.tensorflow import dispatch

    monkeypatch.setattr(dispatch, "FUSED_FROM", dict.fromkeys(dispatch.FUSED_FROM, 0))
    monkeypatch.setattr(dispatch, "DENSE_TF_OPS", set())


def _graph_ops(fn, *specs, jit=False, branches=True):
    graph = tf.function(fn, jit_compile=jit).get_concrete_function(*specs).graph
    ops = list(graph.get_operations())
    if branches:
        # Ops inside tf.cond branches or custom gradients' second-order
        # functions live in their own function graphs.
        for function in graph._functions.values():
            ops.extend(function.graph.get_operations())
    return ops


def _op_types(fn, *specs, jit=False):
    return {op.type for op in _graph_ops(fn, *specs, jit=jit)}


def _bn(x, training, fused_arg=None, axis=-1):
    c = x.shape[axis]
    return batch_norm(x, tf.ones([c]), tf.zeros([c]), tf.zeros([c]), tf.ones([c]),
                      training=training, axis=axis, fused=fused_arg)


@cpu_only
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape,axis,fused_arg,expected",
    [
        ((8, 4, 4, 3), -1, None, True),  # channels-last on CPU: the kernel
        ((8, 6), -1, None, True),  # Dense outputs through [N, 1, 1, C]
        ((2, 5, 3), -1, None, True),
        ((8, 3, 4, 4), 1, None, False),  # channels-first on CPU: TF ops
        ((8, 3, 4, 4), 1, True, True),  # ... unless the kernel is asked for
        ((2, 3, 4, 5, 2), 1, True, True),
        ((8, 4, 4, 3), -1, False, False),
    ],
)
def test_dispatch_on_cpu(shape, axis, fused_arg, expected, training):
    # Inference keeps the kernel for 4-D inputs only (unless asked): its
    # reshapes would stop TFLite folding a Dense layer's batch norm.
    expected = expected and (training or len(shape) == 4 or fused_arg is True)
    spec = tf.TensorSpec([None, *shape[1:]], tf.float32)
    types = _op_types(lambda x: _bn(x, training, fused_arg, axis), spec)
    assert ("FusedBatchNormV3" in types) == expected


def test_float64_takes_tf_ops_and_fused_true_explains_why():
    x = tf.zeros([2, 3], tf.float64)
    types = _op_types(lambda x: _bn(x, True), tf.TensorSpec([None, 3], tf.float64))
    assert "FusedBatchNormV3" not in types
    with pytest.raises(ValueError) as info:
        _bn(x, True, fused_arg=True)
    assert str(info.value) == (
        "batch_norm: fused=True, but the kernel takes float16, bfloat16 or "
        "float32 inputs; received dtype float64.")


def test_fused_argument_error():
    # A wrong type: TypeError, whatever the argument (tests/test_bad_inputs.py).
    with pytest.raises(TypeError) as info:
        _bn(tf.zeros([2, 3]), True, fused_arg="yes")
    assert str(info.value) == (
        "batch_norm: argument `fused` must be None, True or False; received fused='yes'.")
    with pytest.raises(TypeError) as info:
        BatchNorm(fused=1.0, name="bn")
    assert str(info.value) == (
        "BatchNorm 'bn': argument `fused` must be None, True or False; received fused=1.0.")


def test_under_xla_tf_ops_serve_by_default():
    # XLA fuses plain ops into one or two loops and beats its own lowering
    # of the fused kernel on CPU (benchmarks/README.md).
    spec = tf.TensorSpec([8, 4, 4, 3], tf.float32)
    assert "FusedBatchNormV3" not in _op_types(lambda x: _bn(x, True), spec, jit=True)
    assert "FusedBatchNormV3" in _op_types(lambda x: _bn(x, True, True), spec, jit=True)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_half_precision_kernel_makes_no_full_size_float32_copy(dtype, training):
    # The CPU kernel's shift for offset-dominated channels stays in the
    # input's dtype too; only the first rows' sample is measured.
    shape = [8, 4, 4, 3]
    ops = _graph_ops(lambda x: _bn(x, training), tf.TensorSpec(shape, dtype))
    assert "FusedBatchNormV3" in {op.type for op in ops}
    for op in ops:
        if op.type == "Cast":
            out = op.outputs[0]
            assert not (out.dtype == tf.float32 and out.shape.num_elements() == np.prod(shape)), op


@pytest.mark.parametrize("shape,axis", [((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1), ((1, 6), -1)])
def test_kernel_moving_variance_is_the_biased_one(shape, axis):
    # The kernel reports n/(n-1) * var; the moving variance must get var.
    # (1, 6): one value per channel, n - 1 = 0: the variance is 0, not NaN.
    x = np.random.RandomState(0).normal(1.0, 2.0, shape)
    params = random_params(shape[axis])
    want = np_batch_norm(x, *params, training=True, momentum=0.0, axis=axis)
    got = batch_norm(x.astype(np.float32), *[p.astype(np.float32) for p in params],
                     training=True, momentum=0.0, axis=axis, fused=True)
    np.testing.assert_allclose(got[2], want[2], rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(got[0], want[0], rtol=F32_TOL, atol=F32_TOL)


@cpu_only
@pytest.mark.parametrize("fused_arg", [True, False])
def test_large_offset_moving_variance_on_each_path_no_worse_than_tf_moments(fused_arg):
    # 1e4 + N(0, 1) over 128*16*16 values per channel: the CPU kernel's own
    # float32 sums lose the variance here, so the kernel path must notice
    # (mean^2 > 1e4 var) and hand the batch to the two-pass statistics.
    x = (1e4 + np.random.RandomState(4).normal(0.0, 1.0, (128, 16, 16, 4))).astype(np.float32)
    truth = x.astype(np.float64).var(axis=(0, 1, 2))
    _, _, var = batch_norm(x, None, None, tf.zeros([4]), tf.zeros([4]), training=True,
                           momentum=0.0, fused=fused_arg)
    _, theirs = tf.nn.moments(tf.constant(x), axes=[0, 1, 2])
    ours_err = np.abs(var.numpy() - truth)
    assert np.all(ours_err <= np.abs(theirs.numpy() - truth) + 1.2e-7)
    np.testing.assert_allclose(var, truth, rtol=1e-5)


def test_offset_dominated_ratio():
    mean = tf.constant([0.0, 50.0, -99.0, 101.0])
    var = tf.constant([1.0, 1.0, 1.0, 1.0])
    # More than 10 standard deviations from zero.
    assert ops.offset_dominated(mean, var).numpy().tolist() == [False, True, True, True]
    assert ops.offset_dominated(tf.constant([9.9]), tf.constant([1.0])).numpy().tolist() == [
        False]


def test_sample_shift_reads_the_first_rows_and_moves_only_channels_far_from_zero():
    # [32, 2, 2, 5]: 4 values per image and channel, so the sample is the
    # first 16 images (64 values). Each channel is c + (+-1, alternating):
    # its sample mean is c exactly, its sample std 1.
    signs = np.where(np.arange(32 * 4) % 2 == 0, 1.0, -1.0).reshape(32, 2, 2, 1)
    centres = np.array([1e4, 50.0, 3.0, 0.0, 7.0])
    x = centres + signs * np.ones(5)
    x[16:, :, :, 4] = 1e3  # past the sample: not read
    view = tf.constant(x, tf.float32)
    shift = fused._sample_shift(view, gamma=tf.ones([5]), beta=tf.zeros([5]), epsilon=1e-5,
                                data_format="NHWC")
    # 1e4 and 50 lie more than 10 std from zero; 3 and 0 don't; 7 is the
    # sample's mean although the batch's is 503.5.
    np.testing.assert_array_equal(shift, [1e4, 50.0, 0.0, 0.0, 0.0])
    x[:, :, :, 4] = np.where(np.arange(32)[:, None, None] < 16, 70.0 + signs[..., 0], 1e3)
    shift = fused._sample_shift(tf.constant(x, tf.float32), gamma=tf.ones([5]),
                                beta=tf.zeros([5]), epsilon=1e-5, data_format="NHWC")
    assert shift.numpy()[4] == 70.0


def test_sample_shift_of_an_empty_batch_is_zero():
    view = tf.zeros([0, 1, 1, 3], tf.float32)
    shift = fused._sample_shift(view, gamma=tf.ones([3]), beta=tf.zeros([3]), epsilon=1e-5,
                                data_format="NHWC")
    np.testing.assert_array_equal(shift, [0.0, 0.0, 0.0])


@cpu_only
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16])
def test_ordinary_batch_gives_the_unshifted_kernel_bit_for_bit(dtype):
    # No channel is far from zero: the kernel sees the batch itself, so the
    # guard changes nothing, in a graph (Switch/Merge) or eagerly.
    x = tf.cast(np.random.RandomState(5).normal(0.5, 2.0, (8, 4, 4, 6)), dtype)
    gamma, beta = tf.constant(np.linspace(0.5, 2.0, 6), tf.float32), tf.ones([6])
    plain = fused._kernel(x, gamma=gamma, beta=beta, epsilon=1e-3, data_format="NHWC")
    for run in (lambda f: f(), tf.function(lambda f: f())):
        y, stats = run(lambda: fused.train(x, gamma=gamma, beta=beta, epsilon=1e-3, axis=3))
        np.testing.assert_array_equal(y, plain.y)
        np.testing.assert_array_equal(stats.mean, plain.batch_mean)


@cpu_only
@pytest.mark.parametrize("dtype,spread,var_tol,tol", [(tf.float16, 16.0, 1e-4, 2e-3),
                                                      (tf.bfloat16, 32.0, 1e-3, 1.6e-2)])
def test_half_precision_offset_dominated_batch_keeps_its_statistics(dtype, spread, var_tol, tol):
    # 1e4 + N(0, spread), a few ulps of the dtype at 1e4, over 128x32x32
    # values: unshifted, the kernel's mean is off by 7-9 % of the std. The
    # reference is the float64 statistics of the half-
    # precision data; float32 sums of centred data are good to ~1e-6, the
    # output to its own rounding (2^-11, 2^-8 of |y| <= 4).
    x = 1e4 + np.random.RandomState(6).normal(0.0, spread, (128, 32, 32, 1))
    x = tf.cast(x, dtype)
    x64 = tf.cast(x, tf.float64).numpy()
    y, stats = fused.train(x, gamma=None, beta=None, epsilon=1e-5, axis=3)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    # A float32 mean near 1e4 is itself rounded to 1e-3: 1e-4 of the std here.
    np.testing.assert_allclose(stats.mean, mean, rtol=0, atol=1e-4 * float(np.sqrt(var[0])))
    # bfloat16 leaves five values (multiples of 64) once centred; the kernel
    # measures their variance to 5e-4 (as it does unshifted data there).
    np.testing.assert_allclose(stats.variance, var, rtol=var_tol)
    want = (x64 - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(tf.cast(y, tf.float64), want, rtol=tol, atol=tol)


@cpu_only
def test_training_graph_runs_the_kernel_once_over_the_batch_without_a_cond():
    # The accuracy guard must not trace a second path per batch norm (a
    # tf.cond doubled a model's first-step time, issue 14): one kernel pass
    # over the batch, one over the first rows' sample, one gradient kernel,
    # and no functional control flow.
    layer = BatchNorm()
    layer.build((None, 4, 4, 3))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x] + layer.trainable_weights)

    ops = _graph_ops(step, tf.TensorSpec([16, 4, 4, 3], tf.float32))
    types = [op.type for op in ops]
    assert not {"If", "StatelessIf", "Case", "While", "StatelessWhile"} & set(types)
    kernels = [op for op in ops if op.type == "FusedBatchNormV3"]
    assert sorted(op.inputs[0].shape.as_list()[0] for op in kernels) == [4, 16]
    assert types.count("FusedBatchNormGradV3") == 1


def test_inference_epsilon_below_kernel_limit_is_folded_into_variance(monkeypatch):
    # Older cuDNN rejects epsilon < 1.001e-5. Simulate that limit on CPU
    # (whose kernel accepts any epsilon, so the arithmetic can be checked):
    # the kernel must get var + eps - limit and the limit as epsilon.
    monkeypatch.setattr(fused, "min_epsilon", lambda: 1e-2)
    x = np.random.RandomState(1).normal(0.0, 0.05, (6, 3)).astype(np.float32)
    params = [p.astype(np.float32) for p in random_params(3)]
    params[3] = np.array([1e-3, 2e-3, 5e-3], np.float32)  # small: eps matters
    want = np_batch_norm(x, *params, training=False, epsilon=1e-5)
    got = batch_norm(x, *params, training=False, epsilon=1e-5, fused=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError) as info:
        batch_norm(x, *params, training=True, epsilon=1e-5, fused=True)
    assert str(info.value) == (
        "batch_norm: fused=True, but this cuDNN needs epsilon >= 0.01 in "
        "training; received epsilon=1e-05.")


@cpu_only
def test_no_epsilon_limit_on_cpu():
    assert fused.min_epsilon() == 0.0


@pytest.mark.parametrize("fused_arg", [True, False])
def test_xla_train_step_gradients_match_eager(fused_arg):
    rng = np.random.RandomState(2)
    x = tf.constant(rng.normal(0.5, 2.0, (4, 3, 3, 5)), tf.float32)
    dy = tf.constant(rng.normal(0.0, 1.0, (4, 3, 3, 5)), tf.float32)
    layer = BatchNorm(fused=fused_arg)
    layer.build(x.shape)
    xla = train_step_gradients(layer, x, dy, jit_compile=True)
    for got, want in zip(xla, train_step_gradients(layer, x, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_general_path_gradient_without_gamma_or_beta_matches_finite_differences():
    rng = np.random.RandomState(3)
    x = tf.constant(rng.normal(0.0, 1.0, (4, 2, 3)))
    w = tf.constant(rng.normal(0.0, 1.0, (4, 2, 3)))

    def f(x):
        y, _, _ = batch_norm(x, None, None, tf.zeros(2, tf.float64), tf.ones(2, tf.float64),
                             training=True, axis=1)
        return tf.reduce_sum(w * y * y + y)

    theoretical, numerical = tf.test.compute_gradient(f, [x])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-6)


def test_general_path_backward_is_the_custom_gradient():
    # The custom backward reuses the forward's mean and inverse std; TF's
    # autodiff of the forward would differentiate the rsqrt (RsqrtGrad) and
    # the mean/variance reductions instead.
    def fwd_bwd(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, _, _ = batch_norm(x, None, None, tf.zeros([5]), tf.ones([5]),
                                 training=True, fused=False)
        return tape.gradient(y, x)

    types = _op_types(fwd_bwd, tf.TensorSpec([8, 5], tf.float32))
    assert "FusedBatchNormV3" not in types and "FusedBatchNormGradV3" not in types
    assert "RsqrtGrad" not in types
    assert "IdentityN" in types  # how tf.custom_gradient appears in a graph


@cpu_only
@pytest.mark.parametrize("shape", [(16, 4, 4, 3), (40, 8, 8, 3)])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_offset_dominated_batch_is_shifted_to_every_order(mode, shape):
    # Eagerly (Python picks the shifted input), in a tf.function (Switch and
    # Merge pick it) and under XLA (with fused=True) the kernel must see an
    # offset-dominated batch shifted, for outputs, statistics and gradients
    # of every order, and the others as they are, in one trace. 40x8x8 is
    # more than fused.SUM_LIMIT values per channel: statistics in groups,
    # the gradient kernel given them.
    layer = BatchNorm(fused=True, momentum=0.0)
    layer.build((None,) + shape[1:])
    rng = np.random.RandomState(9)
    upstream = tf.constant(rng.normal(0.0, 1.0, shape), tf.float32)

    def step(x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * upstream)
            dx = inner.gradient(loss, x)
            penalty = tf.reduce_sum(dx * dx)
        return y, dx, outer.gradient(penalty, x)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    for offset in (0.0, 3e4):
        x64 = offset + rng.normal(0.0, 1.0, shape)
        y, dx, ddx = step(tf.constant(x64, tf.float32))
        # The reference sees the float32 data, centred in float64.
        x32 = x64.astype(np.float32).astype(np.float64)
        want, _, var = np_batch_norm(x32, None, None, np.zeros(3), np.ones(3), training=True,
                                     momentum=0.0)
        np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-4)
        np.testing.assert_allclose(y, want, rtol=2e-3, atol=2e-3)
        centred = tf.constant(x32 - x32.mean(axis=(0, 1, 2)), tf.float32)
        ref = BatchNorm(fused=False)
        ref.build((None,) + shape[1:])

        def reference(x):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    loss = tf.reduce_sum(ref(x, training=True) * upstream)
                dx = inner.gradient(loss, x)
                penalty = tf.reduce_sum(dx * dx)
            return dx, outer.gradient(penalty, x)

        # Batch norm's gradients don't change under a per-channel shift:
        # the centred batch is the reference.
        want_dx, want_ddx = reference(centred)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-3, atol=1e-3 * np.abs(want_dx).max())
        np.testing.assert_allclose(ddx, want_ddx, rtol=1e-3, atol=1e-3 * np.abs(want_ddx).max())
    if mode != "eager":
        assert step.experimental_get_tracing_count() == 1



# --- statistics of batches larger than the kernel sums at once -------------


def _few_valued_or_offset(data, shape):
    """0/1 data (`few_valued`), or data at 1e6 with std 0.1 (which float32
    leaves 1 to 3 distinct values per std)."""
    if data == "binary":
        return few_valued(shape, seed=11)
    rng = np.random.default_rng(11)
    channels = shape[-1]
    means = 1e6 * np.linspace(1.0, 2.0, channels)
    return (means + np.linspace(0.1, 1.0, channels) * rng.standard_normal(shape)).astype(
        np.float32)


@cpu_only
@pytest.mark.parametrize("mode", ["eager", "graph", "graph_unknown", "xla"])
@pytest.mark.parametrize("shape,axis", [((131, 32, 32, 4), -1), ((2**17 + 37, 4), -1),
                                        ((33, 4, 64, 64), 1)])
@pytest.mark.parametrize("data", ["binary", "offset"])
def test_statistics_exact_beyond_what_the_kernel_sums_at_once(data, shape, axis, mode):
    # 134144 and 131109 values per channel. Measured in one call, the
    # kernel's variance of the 0/1 data was off by 1.3e-3 (oneDNN) to
    # 2.0e-3 (Eigen) relative, of the data at 1e6 by 1.6e-4 to 2.9e-4:
    # above the 1e-4 bound of tests/test_offsets.py, which holds here
    # (measured within 1.3e-5: each group sums at most SUM_LIMIT values).
    # 131 * 1024 and 2^17 + 37 rows are no multiple of the groups: a tail.
    # Channels first (fused=True), TF ops' staged sums measure the batch.
    if axis == 1:
        x = np.moveaxis(_few_valued_or_offset(data, shape[:1] + shape[2:] + shape[1:2]), -1, 1)
        x = np.ascontiguousarray(x)
    else:
        x = _few_valued_or_offset(data, shape)
    layer = BatchNorm(fused=True, momentum=0.0, axis=axis)
    layer.build((None,) + shape[1:])
    if mode == "eager":
        y = layer(x, training=True)
    else:
        spec = tf.TensorSpec((None,) + shape[1:]) if mode == "graph_unknown" else None
        y = tf.function(lambda t: layer(t, training=True), jit_compile=mode == "xla",
                        input_signature=None if spec is None else [spec])(x)
    x64 = x.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean, var = x64.mean(axes), x64.var(axes)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-4)
    # A float32 mean at 2e6 is rounded to 0.125 / 2e6 = 6e-8 of it.
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=2e-7, atol=1e-7)
    # |y| <= 100 for the rarest 0/1 channel: float32 rounds it to 4e-6.
    keep = [-1 if i == axis % x.ndim else 1 for i in range(x.ndim)]
    want = (x64 - mean.reshape(keep)) / np.sqrt(var.reshape(keep) + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=5e-5)


@cpu_only
def test_large_batches_take_grouped_statistics_and_small_ones_one_kernel():
    # Up to SUM_LIMIT values per channel the kernel's own statistics serve
    # (one call); beyond, or with the size unknown when traced, a call on
    # the [A/k, k*C] view measures them and the kernel's inference form
    # normalizes.
    def kernels(shape):
        fn = lambda x: fused.train(x, gamma=None, beta=None, epsilon=1e-3, axis=len(shape) - 1)
        ops = _graph_ops(fn, tf.TensorSpec(shape, tf.float32))
        return sorted(((op.inputs[0].shape.as_list(), op.get_attr("is_training"))
                       for op in ops if op.type == "FusedBatchNormV3"), key=str)

    limit = fused.SUM_LIMIT
    assert kernels([limit // 64, 8, 8, 3]) == [([1, 8, 8, 3], True), ([32, 8, 8, 3], True)]
    # 4103 rows: 3 groups of 1367 (3 channels each: 9), 2 rows over.
    big = kernels([2 * limit + 7, 3])
    assert ([1367, 1, 1, 9], True) in big and ([2, 1, 1, 3], True) in big
    assert ([2 * limit + 7, 1, 1, 3], False) in big
    unknown = kernels([None, 8, 8, 3])
    assert ([None, 8, 8, 3], False) in unknown


@cpu_only
@pytest.mark.parametrize("bad", ["nan", "empty"])
def test_grouped_statistics_refuse_bad_batches(bad):
    # With the batch size unknown the grouped statistics serve every call;
    # a NaN or an empty batch must still leave the moving statistics as
    # they were, and an empty one give zero gradients.
    layer = BatchNorm(fused=True)
    layer.build((None, 8, 8, 3))
    layer.moving_mean.assign([1.0, 2.0, 3.0])
    before = [layer.moving_mean.numpy(), layer.moving_variance.numpy()]

    @tf.function(input_signature=[tf.TensorSpec((None, 8, 8, 3))])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, tape.gradient(y, [x, layer.gamma, layer.beta])

    x = np.ones((0, 8, 8, 3), np.float32) if bad == "empty" else np.random.default_rng(
        3).standard_normal((40, 8, 8, 3)).astype(np.float32)
    if bad == "nan":
        x[17, 3, 4, 1] = np.nan
    y, grads = step(x)
    assert y.shape == x.shape
    np.testing.assert_array_equal(layer.moving_mean, before[0])
    np.testing.assert_array_equal(layer.moving_variance, before[1])
    assert layer.refused_batches == 1
    if bad == "empty":
        for g in grads[1:]:
            np.testing.assert_array_equal(g, np.zeros(3))
