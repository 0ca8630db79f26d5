"""The layer and the op under every Keras backend: one suite, run by each
backend's pass in CI (tests/conftest.py collects only it and test_import
outside TensorFlow).

On TensorFlow it checks the TensorFlow kernels through the same public
API; on JAX, the keras.ops kernel (keras_bn/backend/portable.py) with JAX's
jit, `stateless_call`, Keras's JAX trainer and JAX's own autodiff, forward
mode included. References are float64 NumPy (tests/reference.py) of the
same float32 values; tolerances are float32's (about 1e-6 relative per
operation, a few dozen operations) unless a case says otherwise.
"""

import numpy as np
import pytest

import keras
from keras import ops as K

import keras_bn
from keras_bn import backend
from tests.reference import np_batch_norm
from tests.reference import random_params
from tests.reference import run_benchmark

BACKEND = keras.config.backend()
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="JAX's transformations")

# (shape, axis): dense, NHWC, NCHW, rank 3 and rank 5.
CASES = {
    "dense": ((16, 5), -1),
    "nhwc": ((4, 3, 3, 6), -1),
    "nchw": ((4, 6, 3, 3), 1),
    "rank3": ((4, 7, 5), -1),
    "rank5": ((2, 3, 2, 2, 4), -1),
}


def _data(shape, seed=0, offset=1.0, scale=2.0):
    rng = np.random.RandomState(seed)
    return (rng.normal(size=shape) * scale + offset).astype("float32")


def _np(t):
    return np.asarray(K.convert_to_numpy(t), np.float64)


def _layer(shape, axis, seed=0, **kwargs):
    bn = keras_bn.BatchNorm(axis=axis, **kwargs)
    bn.build(shape)
    channels = shape[axis]
    gamma, beta, mean, var = random_params(channels, seed)
    bn.set_weights([gamma, beta, mean, var])
    return bn, (gamma, beta, mean, var)


# Tier 1: a hand-computed case.

def test_two_values_per_channel_normalize_to_minus_one_and_one():
    # Mean 2 and variance 1 per channel (epsilon 0 is refused; 1e-5 moves
    # the result by 5e-6): the batch [1, 3] normalizes to [-1, 1].
    bn = keras_bn.BatchNorm(momentum=0.0)
    y = bn(np.array([[1.0, 10.0], [3.0, 14.0]], "float32"), training=True)
    np.testing.assert_allclose(_np(y), [[-1.0, -1.0], [1.0, 1.0]], atol=1e-5)
    np.testing.assert_allclose(_np(bn.moving_mean), [2.0, 12.0])
    np.testing.assert_allclose(_np(bn.moving_variance), [1.0, 4.0])


# Tier 2: against float64 NumPy.

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_call_matches_float64_reference(case, training):
    shape, axis = CASES[case]
    bn, (gamma, beta, mean, var) = _layer(shape, axis)
    x = _data(shape)
    y = bn(x, training=training)
    want, new_mean, new_var = np_batch_norm(
        x, gamma, beta, mean, var, training=training, axis=axis)
    np.testing.assert_allclose(_np(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(bn.moving_mean), new_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(bn.moving_variance), new_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["dense", "nhwc", "nchw"])
def test_batch_variance_exact_at_offset_1e6(case):
    # Channel means 1e6..2e6 and stds down to 0.1: a float32 mean is off by
    # up to 0.03 there, which an uncorrected second pass would add squared
    # to a variance of 0.01. Against float64 statistics of the same values.
    shape, axis = CASES[case]
    shape = (64,) + shape[1:]
    channels = shape[axis]
    rng = np.random.RandomState(1)
    bshape = [1] * len(shape)
    bshape[axis] = channels
    offsets = (1e6 * rng.uniform(1, 2, channels)).reshape(bshape)
    stds = rng.uniform(0.1, 1.0, channels).reshape(bshape)
    x = (rng.normal(size=shape) * stds + offsets).astype("float32")
    bn = keras_bn.BatchNorm(axis=axis, momentum=0.0)
    y = bn(x, training=True)
    axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    want = x.astype(np.float64).var(axes)
    np.testing.assert_allclose(_np(bn.moving_variance), want, rtol=1e-4)
    # And the output: x - mean formed as (x - shift) - relative mean, since
    # a float32 mean at 1e6 is itself off by up to 0.03, 0.3 std here.
    x64 = x.astype(np.float64)
    want_y = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(x64.var(axes, keepdims=True) + 1e-5)
    np.testing.assert_allclose(_np(y), want_y, atol=1e-4)


def test_inference_is_centred_first_at_offset_1e4():
    # (x - mean) * a + beta: exact where x * a + b would round x * a at
    # 1e4's magnitude (4e-3 off).
    x = _data((32, 4), offset=1e4, scale=1.0)
    bn = keras_bn.BatchNorm()
    bn.build(x.shape)
    mean, var = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    bn.set_weights([np.ones(4), np.zeros(4), mean.astype("float32"), var.astype("float32")])
    want = (x - mean.astype("float32")) / np.sqrt(var.astype("float32") + 1e-5)
    np.testing.assert_allclose(_np(bn(x, training=False)), want, atol=1e-5)


def test_op_returns_the_layers_output_and_moving_statistics():
    shape, axis = CASES["nhwc"]
    x = _data(shape)
    gamma, beta, mean, var = random_params(shape[axis])
    y, new_mean, new_var = keras_bn.batch_norm(
        x, gamma, beta, mean, var, training=True, momentum=0.8, axis=axis)
    want, want_mean, want_var = np_batch_norm(
        x, gamma, beta, mean, var, training=True, momentum=0.8, axis=axis)
    np.testing.assert_allclose(_np(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(new_mean), want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(new_var), want_var, rtol=1e-6, atol=1e-6)


# The features, each against its NumPy definition.

def test_ghost_batches_normalize_each_sub_batch_and_average_their_statistics():
    x = _data((8, 3))
    bn = keras_bn.BatchNorm(virtual_batch_size=4, momentum=0.0)
    y = bn(x, training=True)
    halves = x.astype(np.float64).reshape(2, 4, 3)
    mean, var = halves.mean(1, keepdims=True), halves.var(1, keepdims=True)
    want = ((halves - mean) / np.sqrt(var + 1e-5)).reshape(8, 3)
    np.testing.assert_allclose(_np(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(bn.moving_mean), mean.mean(0)[0], rtol=1e-6)
    np.testing.assert_allclose(_np(bn.moving_variance), var.mean(0)[0], rtol=1e-6)


def test_ghost_batches_unbiased_variance_counts_a_sub_batch():
    # n / (n - 1) with n the sub-batch's 4 values, as TensorFlow's kernels
    # and tf_keras count them, not the batch's 8.
    x = _data((8, 3))
    bn = keras_bn.BatchNorm(virtual_batch_size=4, momentum=0.0, unbiased_moving_variance=True)
    bn(x, training=True)
    halves = x.astype(np.float64).reshape(2, 4, 3)
    np.testing.assert_allclose(_np(bn.moving_variance), halves.var(1, ddof=1).mean(0), rtol=1e-5)


def test_masked_positions_stay_out_of_the_statistics():
    x = _data((4, 5, 3))
    mask = np.ones((4, 5), bool)
    mask[:, 3:] = False
    x[:, 3:] = 1e3  # would dominate the statistics if counted
    bn = keras_bn.BatchNorm(momentum=0.0)
    y = bn(x, training=True, mask=mask)
    kept = x[:, :3].astype(np.float64).reshape(-1, 3)
    mean, var = kept.mean(0), kept.var(0)
    np.testing.assert_allclose(_np(bn.moving_mean), mean, rtol=1e-6)
    np.testing.assert_allclose(_np(bn.moving_variance), var, rtol=1e-5)
    np.testing.assert_allclose(_np(y)[:, :3], (x[:, :3] - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_all_masked_batch_is_refused_and_counted():
    bn = keras_bn.BatchNorm()
    x = _data((2, 3, 4))
    bn(x, training=False)  # builds
    before = [_np(v) for v in (bn.moving_mean, bn.moving_variance)]
    bn(x, training=True, mask=np.zeros((2, 3), bool))
    assert bn.refused_batches == 1
    for v, old in zip((bn.moving_mean, bn.moving_variance), before):
        np.testing.assert_array_equal(_np(v), old)


def test_renorm_matches_its_definition():
    # Ioffe (2017): y = gamma * (x_hat * r + d) + beta with r and d clipped;
    # at the start renorm_mean = 0 and renorm_stddev = 1.
    x = _data((16, 3), offset=1.0, scale=2.0)
    bn = keras_bn.BatchNorm(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5})
    y = bn(x, training=True)
    x64 = x.astype(np.float64)
    mean, std = x64.mean(0), np.sqrt(x64.var(0) + 1e-5)
    r, d = np.clip(std / 1.0, 0.5, 1.5), np.clip(mean / 1.0, -0.5, 0.5)
    np.testing.assert_allclose(_np(y), (x64 - mean) / std * r + d, rtol=1e-5, atol=1e-5)


def test_cumulative_average_is_the_mean_of_batch_statistics():
    bn = keras_bn.BatchNorm(momentum=None)
    a, b = _data((8, 2), seed=1), _data((8, 2), seed=2, offset=5.0)
    bn(a, training=True)
    bn(b, training=True)
    np.testing.assert_allclose(_np(bn.moving_mean), (a.mean(0) + b.mean(0)) / 2, rtol=1e-5)
    assert int(_np(bn.num_batches_tracked)) == 2


def test_unbiased_moving_variance_is_n_over_n_minus_1():
    x = _data((5, 3))
    bn = keras_bn.BatchNorm(momentum=0.0, unbiased_moving_variance=True)
    bn(x, training=True)
    np.testing.assert_allclose(_np(bn.moving_variance), x.astype(np.float64).var(0, ddof=1),
                               rtol=1e-5)


def test_without_running_statistics_inference_uses_the_batch():
    x = _data((8, 3))
    bn = keras_bn.BatchNorm(track_running_stats=False)
    want = (x - x.mean(0)) / np.sqrt(x.astype(np.float64).var(0) + 1e-5)
    np.testing.assert_allclose(_np(bn(x, training=False)), want, rtol=1e-5, atol=1e-5)


def test_non_finite_batch_leaves_moving_statistics_and_is_counted():
    bn = keras_bn.BatchNorm(track_num_batches=True)
    x = _data((4, 3))
    bn(x, training=True)
    before = [_np(v) for v in (bn.moving_mean, bn.moving_variance)]
    x[0, 1] = np.nan
    bn(x, training=True)
    assert bn.refused_batches == 1
    assert int(_np(bn.num_batches_tracked)) == 1
    for v, old in zip((bn.moving_mean, bn.moving_variance), before):
        np.testing.assert_array_equal(_np(v), old)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_float32_weights_and_statistics(policy):
    keras.mixed_precision.set_global_policy(policy)
    x = _data((16, 4))
    bn = keras_bn.BatchNorm(momentum=0.0)
    y = bn(K.cast(x, policy.split("_")[1]), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    assert all(keras.backend.standardize_dtype(v.dtype) == "float32"
               for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
    # The statistics of the half-precision values, reduced in float32.
    half = _np(K.cast(K.cast(x, policy.split("_")[1]), "float32"))
    np.testing.assert_allclose(_np(bn.moving_variance), half.var(0), rtol=1e-5)


def test_fused_true_names_the_backend_where_it_cannot_be_served():
    if BACKEND == "tensorflow":
        keras_bn.BatchNorm(fused=True)  # served
        return
    with pytest.raises(ValueError) as error:
        keras_bn.BatchNorm(fused=True, name="bn")
    assert str(error.value) == (
        "BatchNorm 'bn': argument `fused`: fused=True requires "
        f"TensorFlow's fused kernel, which Keras's {BACKEND} backend doesn't "
        "have; received fused=True. Pass fused=None (the default) or False.")


# Keras's trainer and stateless calls: the state comes back.

@pytest.mark.parametrize("jit_compile", ["auto", True])
def test_fit_leaves_the_batch_statistics_in_the_moving_ones(jit_compile):
    # One batch of all the data, momentum 0: after fit the moving statistics
    # are that batch's, so the trainer carried the update out of its step
    # (on JAX, a jitted stateless step; with jit_compile=True, XLA on
    # TensorFlow and torch.compile on PyTorch).
    x = _data((32, 3), offset=3.0)
    model = keras.Sequential([keras.Input((3,)), keras_bn.BatchNorm(momentum=0.0)])
    model.compile(keras.optimizers.SGD(0.0), "mse",  # gamma and beta stay
                  jit_compile=jit_compile)
    model.fit(x, np.zeros_like(x), batch_size=32, epochs=1, verbose=0, shuffle=False)
    bn = model.layers[0]
    np.testing.assert_allclose(_np(bn.moving_mean), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(_np(bn.moving_variance), x.astype(np.float64).var(0), rtol=1e-5)
    # evaluate and predict use them (inference), and change nothing.
    out = model.predict(x, verbose=0)
    np.testing.assert_allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), atol=1e-4)
    model.evaluate(x, np.zeros_like(x), verbose=0)
    np.testing.assert_allclose(_np(bn.moving_mean), x.mean(0), rtol=1e-5)


def test_fit_counts_a_refused_batch():
    x = _data((8, 3))
    x[5, 0] = np.nan  # the second batch of 4
    model = keras.Sequential([keras.Input((3,)), keras_bn.BatchNorm(track_num_batches=True)])
    model.compile("sgd", "mse")
    model.fit(x, np.zeros_like(x), batch_size=4, epochs=1, verbose=0, shuffle=False)
    bn = model.layers[0]
    assert bn.refused_batches == 1
    assert int(_np(bn.num_batches_tracked)) == 1
    assert np.isfinite(_np(bn.moving_mean)).all()


@pytest.mark.parametrize("shape", [(0, 3), (0, 4, 4, 3)], ids=["dense", "nhwc"])
def test_empty_batch_keeps_its_shape_is_refused_and_has_an_empty_gradient(shape):
    # A batch of no examples (the last of an epoch split across replicas,
    # say) has no statistics: the output is empty, the moving statistics
    # stay, the refusal is counted, and the gradient is empty, not NaN.
    bn = keras_bn.BatchNorm()
    bn.build(shape)
    y = bn(np.zeros(shape, "float32"), training=True)
    assert tuple(y.shape) == shape and bn.refused_batches == 1
    np.testing.assert_array_equal(_np(bn.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(_np(bn.moving_variance), np.ones(3))
    g = _grad(_loss_fn(bn, np.ones(shape, "float32")), np.zeros(shape, "float32"))
    assert tuple(g.shape) == shape


def test_stateless_call_returns_the_new_statistics_and_leaves_the_layer():
    x = _data((8, 3), offset=2.0)
    bn = keras_bn.BatchNorm(momentum=0.0, track_num_batches=True)
    bn.build(x.shape)
    before = [_np(v) for v in bn.non_trainable_variables]
    y, new = bn.stateless_call(bn.trainable_variables, bn.non_trainable_variables, x,
                               training=True)
    for v, old in zip(bn.non_trainable_variables, before):
        np.testing.assert_array_equal(_np(v), old)
    names = [v.name for v in bn.non_trainable_variables]
    values = dict(zip(names, (_np(v) for v in new)))
    np.testing.assert_allclose(values["moving_mean"], x.mean(0), rtol=1e-6)
    assert int(values["num_batches_tracked"]) == 1


@jax_only
def test_jit_of_stateless_call_leaks_no_tracer_and_threads_the_counter():
    import jax

    x = _data((8, 3))
    x[0, 0] = np.inf
    bn = keras_bn.BatchNorm()
    bn.build(x.shape)

    @jax.jit
    def step(trainable, non_trainable, x):
        return bn.stateless_call(trainable, non_trainable, x, training=True)

    _, new = step([v.value for v in bn.trainable_variables],
                  [v.value for v in bn.non_trainable_variables], x)
    names = [v.name for v in bn.non_trainable_variables]
    assert "refused_batches" in names  # state, though not a weight
    assert "refused_batches" not in [w.name for w in bn.weights]
    assert int(new[names.index("refused_batches")]) == 1
    # The layer's own variables hold concrete values still.
    assert bn.refused_batches == 0
    assert np.isfinite(_np(bn(x[1:], training=False))).all()


# Gradients, by each backend's own autodiff.

def _loss_fn(bn, w):
    w = K.convert_to_tensor(w)

    def loss(x):
        return K.sum(bn(x, training=True) * w)
    return loss


def _grad(f, x):
    if BACKEND == "jax":
        import jax

        return jax.grad(f)(x)
    if BACKEND == "torch":
        import torch

        x = torch.tensor(x, requires_grad=True)
        return torch.autograd.grad(f(x), x)[0]
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = f(x)
    return tape.gradient(y, x)


def test_input_gradient_matches_float64_formula():
    x = _data((6, 4))
    w = _data((6, 4), seed=3, offset=0.0, scale=1.0)
    bn, (gamma, _, _, _) = _layer(x.shape, -1)
    got = _np(_grad(_loss_fn(bn, w), x))
    x64, n = x.astype(np.float64), x.shape[0]
    inv = 1 / np.sqrt(x64.var(0) + 1e-5)
    xhat = (x64 - x64.mean(0)) * inv
    want = gamma * inv / n * (n * w - w.sum(0) - xhat * (w * xhat).sum(0))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@jax_only
def test_forward_and_reverse_mode_agree():
    # <jvp(v), u> = <v, vjp(u)>: forward mode (which a custom_vjp would
    # lack) gives the transpose of what reverse mode gives.
    import jax

    x = _data((6, 4))
    bn = keras_bn.BatchNorm()
    bn.build(x.shape)
    f = lambda x: bn(x, training=True)  # noqa: E731
    v, u = _data((6, 4), seed=4, offset=0.0), _data((6, 4), seed=5, offset=0.0)
    _, jv = jax.jvp(f, (x,), (v,))
    _, vjp = jax.vjp(f, x)
    np.testing.assert_allclose(np.vdot(_np(jv), u), np.vdot(v, _np(vjp(u)[0])), rtol=1e-4)


@jax_only
def test_hessian_forward_over_reverse_matches_reverse_over_reverse_and_differences():
    import jax

    x = _data((4, 2))
    w = _data((4, 2), seed=6, offset=0.0, scale=1.0)
    bn = keras_bn.BatchNorm()
    bn.build(x.shape)

    def loss(x):
        return K.sum(K.square(bn(x, training=True)) * w)  # nonzero curvature

    v = _data((4, 2), seed=7, offset=0.0, scale=1.0)
    forward_over_reverse = _np(jax.jvp(jax.grad(loss), (x,), (v,))[1])
    reverse_over_reverse = _np(jax.grad(lambda x: K.sum(jax.grad(loss)(x) * v))(x))
    np.testing.assert_allclose(forward_over_reverse, reverse_over_reverse, rtol=1e-4, atol=1e-4)
    h = _np(jax.hessian(loss)(x)).reshape(8, 8)
    np.testing.assert_allclose(h @ v.reshape(-1), forward_over_reverse.reshape(-1), rtol=1e-4,
                               atol=1e-4)
    # Central differences of the float32 gradient: step 1e-2 keeps the
    # rounding (~1e-7 / 1e-2) and the truncation (~1e-4) near 1e-4 of the
    # Hessian's scale; 1e-2 leaves room.
    step = 1e-2
    g = jax.grad(loss)
    diff = (_np(g(x + step * v)) - _np(g(x - step * v))) / (2 * step)
    scale = np.abs(forward_over_reverse).max()
    np.testing.assert_allclose(diff, forward_over_reverse, atol=1e-2 * scale)


# Saving.

def test_keras_file_round_trip_keeps_predictions(tmp_path):
    x = _data((8, 3))
    model = keras.Sequential([keras.Input((3,)), keras_bn.BatchNorm(renorm=True)])
    model.compile("sgd", "mse")
    model.fit(x, np.zeros_like(x), batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "bn.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert [w.name for w in loaded.weights] == [w.name for w in model.weights]


def test_backend_module_names_the_backend_and_its_kernel():
    assert backend.NAME == BACKEND
    x = K.convert_to_tensor(_data((4, 3)))
    reason = keras_bn.dispatch.route(x, 1, 1e-5, training=True).reason
    assert isinstance(reason, str) and reason
    if BACKEND == "jax":
        assert reason == ("the jax backend: keras.ops, differentiated by the "
                          "backend's autodiff")
    if BACKEND == "torch":
        assert reason == "torch's native batch norm, its own backward to every order"


@jax_only
def test_backends_doc_runs_as_written(tmp_path):
    # tests/test_docs.py runs every doc under TensorFlow; this one's code
    # is JAX's, so its suite runs it.
    import os
    import pathlib
    import subprocess
    import sys

    from tests.test_docs import python_blocks

    path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "backends.md"
    script = "\n\n".join(python_blocks(str(path)))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


_DATA_PARALLEL = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, keras, numpy as np
import keras_bn
assert len(jax.devices()) == 2
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
# Each device's half has its own mean (0 and 10): the global batch's
# statistics differ from either half's.
x = np.concatenate([np.random.RandomState(0).normal(0, 1, (8, 3)),
                    np.random.RandomState(1).normal(10, 2, (8, 3))]).astype("float32")
model = keras.Sequential([keras.Input((3,)), keras_bn.BatchNorm(momentum=0.0, synchronized=True)])
model.compile(keras.optimizers.SGD(0.0), "mse")
model.fit(x, np.zeros_like(x), batch_size=16, epochs=1, verbose=0, shuffle=False)
bn = model.layers[0]
np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-5)
np.testing.assert_allclose(bn.moving_variance.numpy(), x.astype(np.float64).var(0), rtol=1e-5)
print("ok")
"""


@jax_only
def test_synchronized_under_data_parallel_takes_the_global_batch():
    # Two CPU devices (XLA's host-platform flag, set before JAX starts, so
    # in a fresh process); DataParallel splits the batch across them.
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _DATA_PARALLEL], env=dict(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "ok", result.stderr[-3000:]


@pytest.mark.skipif(BACKEND == "tensorflow", reason="benchmarks/bench_layers.py is "
                    "TensorFlow's (tests/test_benchmarks.py)")
def test_backend_benchmark_runs_and_records_its_conditions(tmp_path):
    import json

    out = tmp_path / "out.json"
    run_benchmark("bench_backends.py", "--quick", "--json", str(out))
    record = json.loads(out.read_text())
    assert {"backend", "cpu", BACKEND, "keras", "git"} <= set(record["environment"])
    assert {(r["case"], r["mode"]) for r in record["rows"]} == {
        (case, mode) for case in ("dense 64x16", "conv NHWC 4x8x8x8", "conv NCHW 4x8x8x8")
        for mode in ("inference", "train_step")}
    assert all(r["keras_bn_ms"] > 0 and r["keras_ms"] > 0 for r in record["rows"])


_PER_DEVICE = _DATA_PARALLEL.replace("synchronized=True", "synchronized=False").replace(
    """np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-5)
np.testing.assert_allclose(bn.moving_variance.numpy(), x.astype(np.float64).var(0), rtol=1e-5)""",
    """halves = x.astype(np.float64).reshape(2, 8, 3)
# Each device's own statistics, averaged (equal counts): the within-half
# variance, far below the global batch's (the halves' means differ by 10).
np.testing.assert_allclose(bn.moving_mean.numpy(), halves.mean(1).mean(0), rtol=1e-5)
np.testing.assert_allclose(bn.moving_variance.numpy(), halves.var(1).mean(0), rtol=1e-5)
# And each share is normalized with its own statistics.
y = np.asarray(keras_bn.BatchNorm(synchronized=False)(x, training=True))
want = (halves - halves.mean(1, keepdims=True)) / np.sqrt(halves.var(1, keepdims=True) + 1e-5)
np.testing.assert_allclose(y, want.reshape(16, 3), rtol=1e-4, atol=1e-4)
""")


@jax_only
def test_unsynchronized_under_data_parallel_takes_each_devices_share():
    import os
    import subprocess
    import sys

    assert "synchronized=False" in _PER_DEVICE and "halves" in _PER_DEVICE
    result = subprocess.run([sys.executable, "-c", _PER_DEVICE], env=dict(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "ok", result.stderr[-3000:]


# Other backends' interpreters, as "backend=python,...": .ci/run gives each
# backend's pass the interpreters of the environments it built before.
OTHERS = [tuple(p.split("=", 1)) for p in
          __import__("os").environ.get("KERAS_BN_OTHER_BACKENDS", "").split(",") if "=" in p]

_LOAD_ELSEWHERE = """
import os, sys
os.environ["KERAS_BACKEND"] = sys.argv[1]
import keras, numpy as np
import keras_bn  # registers BatchNorm
folder = sys.argv[2]
x = np.load(os.path.join(folder, "x.npy"))
model = keras.models.load_model(os.path.join(folder, "here.keras"), compile=False)
np.save(os.path.join(folder, "there.npy"), keras.ops.convert_to_numpy(model.predict(x, verbose=0)))
model.save(os.path.join(folder, "there.keras"))
"""


@pytest.mark.skipif(not OTHERS, reason="no other backend's interpreter given "
                    "(KERAS_BN_OTHER_BACKENDS=backend=python,...; .ci/run sets it)")
@pytest.mark.parametrize("other", OTHERS or [("none", "none")], ids=lambda o: o[0])
def test_keras_file_carries_predictions_across_backends(other, tmp_path):
    # Saved here, loaded and saved again under the other backend, loaded
    # back here: the same predictions all the way, the moving statistics
    # included (inference follows them). Loaded without compiling: Keras's
    # optimizers save their backend's own class (torch's Adam is
    # keras.src.backend.torch.optimizers.torch_adam), which another
    # backend can't import.
    import os
    import subprocess

    x = _data((8, 6, 6, 3))
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3),
                              keras_bn.BatchNorm(renorm=True), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    model.compile("adam", "mse")
    model.fit(x, np.zeros((8, 2)), batch_size=4, epochs=2, verbose=0)
    np.save(tmp_path / "x.npy", x)
    model.save(tmp_path / "here.keras")
    name, python = other
    result = subprocess.run([python, "-c", _LOAD_ELSEWHERE, name, str(tmp_path)],
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    want = _np(model.predict(x, verbose=0))
    # Each backend's convolution sums in its own order: float32 rounding.
    np.testing.assert_allclose(np.load(tmp_path / "there.npy"), want, rtol=1e-4, atol=1e-4)
    back = keras.models.load_model(tmp_path / "there.keras", compile=False)
    np.testing.assert_allclose(_np(back.predict(x, verbose=0)), want, rtol=1e-4, atol=1e-4)


# The model-wide functions, on every backend.

def _trained_model(norm):
    x = _data((16, 5, 5, 3))
    model = keras.Sequential([keras.Input((5, 5, 3)), keras.layers.Conv2D(4, 3), norm,
                              keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    model.fit(x, np.zeros((16, 2)), batch_size=8, epochs=2, verbose=0)
    return model, x


def test_conversion_both_ways_keeps_predictions():
    model, x = _trained_model(keras.layers.BatchNormalization(epsilon=1e-3))
    ours = keras_bn.from_keras(model)
    assert isinstance(ours.layers[1], keras_bn.BatchNorm)
    want = _np(model.predict(x, verbose=0))
    np.testing.assert_allclose(_np(ours.predict(x, verbose=0)), want, rtol=1e-5, atol=1e-5)
    back = keras_bn.to_keras(ours)
    assert type(back.layers[1]) is keras.layers.BatchNormalization
    np.testing.assert_allclose(_np(back.predict(x, verbose=0)), want, rtol=1e-5, atol=1e-5)


def test_folding_keeps_predictions():
    model, x = _trained_model(keras_bn.BatchNorm())
    folded = keras_bn.fold_batch_norms(model)
    assert not any(isinstance(layer, keras_bn.BatchNorm) for layer in folded.layers)
    np.testing.assert_allclose(_np(folded.predict(x, verbose=0)), _np(model.predict(x, verbose=0)),
                               rtol=1e-4, atol=1e-4)


def test_recalibrate_takes_numpy_batches():
    # A list of NumPy batches, no tf.data: the moving statistics become the
    # exact ones of the data the batch norm sees.
    model, x = _trained_model(keras_bn.BatchNorm())
    keras_bn.recalibrate(model, [x[:8], x[8:]], verbose=0)
    features = _np(model.layers[0](x)).reshape(-1, 4)
    bn = model.layers[1]
    np.testing.assert_allclose(_np(bn.moving_mean), features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(bn.moving_variance), features.var(0), rtol=1e-4)


def test_torch_state_dict_round_trip():
    bn, _ = _layer((4, 3), -1)
    state = keras_bn.to_torch_state_dict(bn, as_numpy=True)
    again = keras_bn.from_torch(state, axis=-1)
    x = _data((4, 3))
    np.testing.assert_allclose(_np(again(x, training=False)), _np(bn(x, training=False)),
                               rtol=1e-6, atol=1e-6)


_SERVE = """
import sys
import numpy as np
import tensorflow as tf  # and nothing else: no Keras, no keras_bn
served = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[1] + ".x.npy")
np.save(sys.argv[1] + ".served.npy", served.serve(tf.constant(x)).numpy())
"""


@pytest.mark.skipif(BACKEND != "jax" or __import__("importlib").util.find_spec("tensorflow") is None,
                    reason="a JAX model's export goes through jax2tf: JAX and TensorFlow both "
                    "installed (.ci/run adds TensorFlow to its JAX environment for this)")
def test_jax_model_exports_a_saved_model_a_tensorflow_process_serves(tmp_path):
    import os
    import subprocess
    import sys

    model, x = _trained_model(keras_bn.BatchNorm(renorm=True))
    path = str(tmp_path / "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    np.save(path + ".x.npy", x)
    result = subprocess.run([sys.executable, "-c", _SERVE, path], capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The same XLA computation, run by TensorFlow: float32 rounding at most.
    np.testing.assert_allclose(np.load(path + ".served.npy"), _np(model.predict(x, verbose=0)),
                               rtol=1e-5, atol=1e-5)
