"""Checks that need an NVIDIA GPU; each skips cleanly without one.

Run them all with `benchmarks/gpu_check.sh OUT_DIR`, which also runs the
benchmark and keeps every result in OUT_DIR.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from keras_bn import batch_norm
from tests.reference import np_batch_norm
from tests.reference import random_params
from tests.reference import train_step_gradients

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not tf.config.list_physical_devices("GPU"),
                       reason="needs a GPU visible to TensorFlow"),
]

F32_TOL = 1e-5  # see tests/test_ops.py; cuDNN's float32 reductions agree to it
# float16 outputs: a few ulps of float16 around O(1) values (ulp(2) ~ 2e-3).
F16_TOL = 4e-3


def _ops_of(fn, spec):
    graph = tf.function(fn).get_concrete_function(spec).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():
        types |= {op.type for op in function.graph.get_operations()}
    return types


def test_layer_runs_on_the_gpu():
    layer = BatchNorm()
    x = tf.random.normal([8, 4, 4, 6])
    y = layer(x, training=True)
    assert "GPU" in y.device
    assert "GPU" in layer.moving_mean.value.device


@pytest.mark.parametrize("shape,axis", [((8, 4, 4, 6), -1), ((8, 6, 4, 4), 1), ((16, 6), -1)])
def test_fused_kernel_serves_every_layout_with_the_default_epsilon(shape, axis):
    # cuDNN >= 7.5 takes any epsilon, so the default 1e-5 stays on the kernel.
    spec = tf.TensorSpec([None, *shape[1:]], tf.float32)
    c = shape[axis]
    types = _ops_of(lambda x: batch_norm(x, tf.ones([c]), tf.zeros([c]), tf.zeros([c]),
                                         tf.ones([c]), training=True, axis=axis), spec)
    assert "FusedBatchNormV3" in types


@pytest.mark.parametrize("fused_arg", [True, False])
@pytest.mark.parametrize("shape,axis", [((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1)])
def test_float32_matches_reference_on_both_paths(shape, axis, fused_arg):
    x = np.random.RandomState(0).normal(0.5, 2.0, shape)
    params = random_params(shape[axis])
    want = np_batch_norm(x, *params, training=True, axis=axis)
    got = batch_norm(x.astype(np.float32), *[p.astype(np.float32) for p in params],
                     training=True, axis=axis, fused=fused_arg)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("fused_arg", [True, False])
def test_float16_parity_with_reference_and_keras(fused_arg):
    shape = (8, 5, 5, 6)
    x = np.random.RandomState(1).normal(0.5, 2.0, shape).astype(np.float16)
    params = [p.astype(np.float32) for p in random_params(6)]
    want = np_batch_norm(x.astype(np.float64), *params, training=True)
    ours = BatchNorm(dtype="mixed_float16", fused=fused_arg)
    theirs = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype="mixed_float16")
    for layer in (ours, theirs):
        layer.build(shape)
        layer.set_weights(params)
    y = ours(x, training=True)
    assert y.dtype == tf.float16
    np.testing.assert_allclose(tf.cast(y, tf.float64), want[0], atol=F16_TOL, rtol=F16_TOL)
    np.testing.assert_allclose(ours.moving_variance, want[2], rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(theirs(x, training=True), tf.float32),
                               atol=F16_TOL, rtol=F16_TOL)


def test_xla_train_step_matches_eager_on_gpu():
    x = tf.random.normal([8, 5, 5, 6], seed=2)
    dy = tf.random.normal([8, 5, 5, 6], seed=3)
    layer = BatchNorm()
    layer.build(x.shape)
    xla = train_step_gradients(layer, x, dy, jit_compile=True)
    for got, want in zip(xla, train_step_gradients(layer, x, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fit_with_keras_default_xla_on_gpu():
    # On a GPU, compile(jit_compile="auto") turns XLA on for fit().
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        BatchNorm(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(4)
    x, y = rng.normal(0.5, 2.0, (32, 6, 6, 2)).astype(np.float32), rng.randint(0, 3, 32)
    before = model.layers[1].moving_mean.numpy().copy()
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert not np.allclose(model.layers[1].moving_mean.numpy(), before)
