"""A float64 NumPy reference for batch normalization, written from the
formula and sharing no code with keras_bn, and small shared test helpers."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def np_batch_norm(
    x, gamma, beta, moving_mean, moving_var, *, training, momentum=0.9,
    epsilon=1e-5, axis=-1,
):
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    moving_mean = np.asarray(moving_mean, np.float64)
    moving_var = np.asarray(moving_var, np.float64)
    if training:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)  # ddof=0: the biased variance
        new_mean = momentum * moving_mean + (1 - momentum) * mean
        new_var = momentum * moving_var + (1 - momentum) * var
    else:
        mean, var = moving_mean, moving_var
        new_mean, new_var = moving_mean, moving_var
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(shape)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(shape)
    return y, new_mean, new_var


def random_params(channels, seed=0):
    """gamma, beta, moving_mean, moving_var away from their defaults, so a
    swapped or ignored parameter shows in the result."""
    rng = np.random.RandomState(seed)
    gamma = rng.uniform(0.5, 2.0, channels)
    beta = rng.uniform(-1.0, 1.0, channels)
    moving_mean = rng.uniform(-1.0, 1.0, channels)
    moving_var = rng.uniform(0.5, 2.0, channels)
    return gamma, beta, moving_mean, moving_var


def train_step_gradients(layer, x, dy, jit_compile=False):
    """Gradients of a training-mode call w.r.t. x, gamma and beta for the
    upstream gradient `dy`, eagerly or in an XLA-compiled function."""
    import tensorflow as tf

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)

    return tf.function(step, jit_compile=True)(x) if jit_compile else step(x)


def penalty_gradient(f, x, v, sources):
    """d/d(sources) of |d(sum(f(x) * v))/dx|^2, by nested tapes: a gradient
    penalty's gradient, or twice a Hessian-vector product. `sources` are
    tensors or tf.Variables (x among them, or not)."""
    import tensorflow as tf

    with tf.GradientTape() as outer:
        outer.watch(sources)
        with tf.GradientTape() as inner:
            inner.watch(x)
            s = tf.reduce_sum(f(x) * v)
        g = inner.gradient(s, x)
        penalty = tf.reduce_sum(g * g)
    return outer.gradient(penalty, sources)


def run_benchmark(name, *args, timeout=300):
    """benchmarks/NAME with ARGS in a fresh process (this Python and
    environment, the checkout as its working directory); its stdout once it
    succeeded."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", name), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def few_valued(shape, seed=0):
    """0/1 float32 data, p = 0.01..0.5 along the last axis: few distinct
    values, the worst case for a float32 running sum, whose rounding then
    errs the same way at every step."""
    rng = np.random.default_rng(seed)
    return (rng.random(shape) < np.linspace(0.01, 0.5, shape[-1])).astype(np.float32)
