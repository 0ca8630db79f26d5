"""Synchronized BatchNorm and consistent moving statistics on tf.distribute:
MirroredStrategy over two logical CPUs in this process (tests/conftest.py
makes them), and MultiWorkerMirroredStrategy with two worker processes."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from tests.reference import np_batch_norm
from tests.reference import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 statistics merged from two parts vs one pass over the whole: a few
# ulps of O(1) values; 1e-5 is the bound the issue sets.
F32_TOL = 1e-5


def _per_replica(strategy, x):
    """Splits x over the replicas the way a distributed dataset would."""
    ds = tf.data.Dataset.from_tensor_slices(x).batch(len(x))
    return next(iter(strategy.experimental_distribute_dataset(ds)))


def _layer(strategy, channels, **kwargs):
    with strategy.scope():
        layer = BatchNorm(**kwargs)
        layer.build((None, channels))
        layer.set_weights([p.astype(np.float32) for p in random_params(channels)])
    return layer


def _replica_values(variable):
    return [v.numpy() for v in variable.value.values]


def _data(n, channels=3, seed=0):
    return np.random.RandomState(seed).normal(2.0, 3.0, (n, channels)).astype(np.float32)


@pytest.mark.parametrize("n", [13, 14, 1])
def test_synchronized_equals_single_device_on_the_concatenated_batch(strategy, n):
    # 13 examples: 7 and 6 per replica; 1 example: one replica is empty.
    x = _data(n)
    layer = _layer(strategy, 3, synchronized=True)
    params = random_params(3)
    want = np_batch_norm(x, *params, training=True)
    xs = _per_replica(strategy, x)
    sizes = [int(v.shape[0]) for v in strategy.experimental_local_results(xs)]
    assert sum(sizes) == n and len(sizes) == 2

    @tf.function
    def step(xs):
        return strategy.run(lambda x: layer(x, training=True), args=(xs,))

    y = np.concatenate([v.numpy() for v in strategy.experimental_local_results(step(xs))])
    np.testing.assert_allclose(y, want[0], rtol=F32_TOL, atol=F32_TOL)
    for value in _replica_values(layer.moving_mean):
        np.testing.assert_allclose(value, want[1], rtol=F32_TOL, atol=F32_TOL)
    for value in _replica_values(layer.moving_variance):
        np.testing.assert_allclose(value, want[2], rtol=F32_TOL, atol=F32_TOL)
    a, b = _replica_values(layer.moving_variance)
    np.testing.assert_array_equal(a, b)


def test_synchronized_gradients_equal_single_device(strategy):
    x = _data(13, seed=1)
    upstream = np.random.RandomState(2).normal(0.0, 1.0, x.shape).astype(np.float32)
    reference = BatchNorm()
    reference.build((None, 3))
    reference.set_weights([p.astype(np.float32) for p in random_params(3)])
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        y = reference(xt, training=True)
        loss = tf.reduce_sum(y * upstream)
    want = tape.gradient(loss, [xt, reference.gamma, reference.beta])

    layer = _layer(strategy, 3, synchronized=True)
    pairs = _per_replica(strategy, np.concatenate([x, upstream], axis=1))

    @tf.function
    def step(pairs):
        def replica(pair):
            x, up = pair[:, :3], pair[:, 3:]
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, training=True) * up)
            return tape.gradient(loss, [x, layer.gamma, layer.beta])
        return strategy.run(replica, args=(pairs,))

    dx, dgamma, dbeta = step(pairs)
    local = strategy.experimental_local_results
    np.testing.assert_allclose(np.concatenate([v.numpy() for v in local(dx)]), want[0],
                               rtol=1e-4, atol=1e-5)
    # gamma and beta: each replica holds its share; the optimizer sums them.
    np.testing.assert_allclose(sum(v.numpy() for v in local(dgamma)), want[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sum(v.numpy() for v in local(dbeta)), want[2], rtol=1e-4, atol=1e-5)


def test_unsynchronized_normalizes_per_replica_and_pools_moving_stats(strategy):
    # Defined behaviour: each replica normalizes with its own batch; the
    # moving statistics follow the count-weighted mean of the replicas'
    # means and of their (within-replica) variances, the same everywhere.
    x = _data(13, seed=3)
    layer = _layer(strategy, 3, synchronized=False, momentum=0.5)
    params = random_params(3)
    xs = _per_replica(strategy, x)
    parts = [v.numpy() for v in strategy.experimental_local_results(xs)]

    @tf.function
    def step(xs):
        return strategy.run(lambda x: layer(x, training=True), args=(xs,))

    ys = [v.numpy() for v in strategy.experimental_local_results(step(xs))]
    for part, y in zip(parts, ys):
        want = np_batch_norm(part, *params, training=True)
        np.testing.assert_allclose(y, want[0], rtol=F32_TOL, atol=F32_TOL)
    n = np.array([len(p) for p in parts], np.float64)[:, None]
    means = np.stack([p.astype(np.float64).mean(0) for p in parts])
    variances = np.stack([p.astype(np.float64).var(0) for p in parts])
    want_mean = 0.5 * params[2] + 0.5 * (n * means).sum(0) / n.sum()
    want_var = 0.5 * params[3] + 0.5 * (n * variances).sum(0) / n.sum()
    for value in _replica_values(layer.moving_mean):
        np.testing.assert_allclose(value, want_mean, rtol=F32_TOL, atol=F32_TOL)
    for value in _replica_values(layer.moving_variance):
        np.testing.assert_allclose(value, want_var, rtol=F32_TOL, atol=F32_TOL)


def test_without_a_strategy_synchronized_is_the_plain_layer():
    x = _data(9, seed=4)
    plain, synced = BatchNorm(), BatchNorm(synchronized=True)
    np.testing.assert_array_equal(plain(x, training=True), synced(x, training=True))
    np.testing.assert_array_equal(plain.moving_variance.numpy(), synced.moving_variance.numpy())
    assert synced.get_config()["synchronized"] is True
    assert BatchNorm.from_config(synced.get_config()).synchronized is True


def _cnn(synchronized=True):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        BatchNorm(synchronized=synchronized, name="bn_conv"),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


def _fit(model, x, y):
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)


def test_fit_under_mirrored_strategy_matches_single_device(strategy, tmp_path):
    rng = np.random.RandomState(5)
    x, y = rng.normal(0.5, 2.0, (48, 6, 6, 2)).astype(np.float32), rng.randint(0, 3, 48)
    reference = _cnn()
    _fit(reference, x, y)
    with strategy.scope():
        model = _cnn()
    _fit(model, x, y)
    bn, ref_bn = model.get_layer("bn_conv"), reference.get_layer("bn_conv")
    for var, ref in ((bn.moving_mean, ref_bn.moving_mean), (bn.moving_variance, ref_bn.moving_variance)):
        a, b = _replica_values(var)
        np.testing.assert_array_equal(a, b)
        # Three SGD steps with float32 sums split over replicas.
        np.testing.assert_allclose(a, ref.numpy(), rtol=1e-4, atol=1e-5)
    # What is saved is that common value.
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("bn_conv").moving_mean.numpy(),
                                  _replica_values(bn.moving_mean)[0])
    checkpoint = tf.train.Checkpoint(model=model)
    saved = checkpoint.save(str(tmp_path / "ckpt"))
    fresh = _cnn()
    tf.train.Checkpoint(model=fresh).restore(saved).expect_partial()
    np.testing.assert_array_equal(fresh.get_layer("bn_conv").moving_variance.numpy(),
                                  _replica_values(bn.moving_variance)[1])


@pytest.mark.slow
def test_multi_worker_two_processes_match_single_process(tmp_path):
    # Real collectives between two worker processes on 127.0.0.1, started
    # and always cleaned up by examples/distributed.py, bounded in time.
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "distributed.py"),
         "--steps", "3", "--out", str(tmp_path), "--timeout", "150"],
        capture_output=True, text=True, timeout=200, cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    logs = "".join(p.read_text() for p in tmp_path.glob("worker*.log"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "identical on both workers: True" in result.stdout
    workers = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    assert workers[0] == workers[1]

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import distributed
    finally:
        sys.path.pop(0)
    reference = distributed.moving_statistics(distributed.train(3))
    assert set(reference) == set(workers[0])
    for key, value in reference.items():
        # Three SGD steps, sums split over two processes: float32 ulps.
        np.testing.assert_allclose(workers[0][key], value, rtol=1e-4, atol=1e-5)
