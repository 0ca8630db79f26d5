"""Beyond Keras 3: batch renormalization, ghost batches, the cumulative
average, the unbiased moving variance, the bad-batch guard and masks.

Each against a float64 NumPy reference written here from the papers'
formulas, in tf.function and under XLA, and through a .keras round trip.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from tests.reference import np_batch_norm
from tests.reference import random_params

F32_TOL = 1e-5  # see tests/test_ops.py
EPS = 1e-5


def _layer(channels, shape=None, **kwargs):
    layer = BatchNorm(**kwargs)
    layer.build(shape or (None, channels))
    params = [p.astype(np.float32) for p in random_params(channels)]
    layer.set_weights(params + layer.get_weights()[4:])
    return layer, params


def _runner(layer, mode):
    """Calls the layer in training mode eagerly, in tf.function or in XLA."""
    def call(x, **kwargs):
        return layer(x, training=True, **kwargs)
    if mode == "eager":
        return call
    return tf.function(call, jit_compile=(mode == "xla"))


MODES = ["eager", "graph", "xla"]


def _round_trip(layer, tmp_path, x):
    """A one-layer model through a .keras file: same config, weights, output."""
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path).layers[0]
    assert loaded.get_config() == layer.get_config()
    for a, b in zip(loaded.get_weights(), layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded(x), layer(x))
    return loaded


# --- batch renormalization ------------------------------------------------


def np_renorm_step(x, gamma, beta, state, clip, momentum, renorm_momentum):
    """One training step of Batch Renormalization (Ioffe, 2017, Algorithm 1).

    `state` is (moving_mean, moving_std, renorm_mean, renorm_std); inference
    uses moving_mean and moving_std**2 - epsilon as the variance, so that
    it normalizes by the moving sigma itself.
    """
    moving_mean, moving_std, renorm_mean, renorm_std = state
    mean, var = x.mean(0), x.var(0)
    std = np.sqrt(var + EPS)
    rs = np.maximum(renorm_std, np.sqrt(EPS))
    r = np.clip(std / rs, clip.get("rmin", 0), clip.get("rmax", np.inf))
    d = np.clip((mean - renorm_mean) / rs, -clip.get("dmax", np.inf), clip.get("dmax", np.inf))
    y = gamma * ((x - mean) / std * r + d) + beta
    new = (momentum * moving_mean + (1 - momentum) * mean,
           momentum * moving_std + (1 - momentum) * std,
           renorm_momentum * renorm_mean + (1 - renorm_momentum) * mean,
           renorm_momentum * renorm_std + (1 - renorm_momentum) * std)
    return y, new


@pytest.mark.parametrize("mode", MODES)
def test_renorm_matches_reference_over_steps(mode):
    clip = {"rmax": 1.5, "rmin": 0.8, "dmax": 0.5}
    layer, params = _layer(3, renorm=True, renorm_clipping=clip, renorm_momentum=0.7)
    run = _runner(layer, mode)
    gamma, beta, moving_mean, _ = [p.astype(np.float64) for p in params]
    # Initial moving stddev and renorm statistics: sqrt(1) and mean 0.
    state = (moving_mean, np.ones(3), np.zeros(3), np.ones(3))
    rng = np.random.RandomState(0)
    for step in range(4):
        # Data far from the renorm statistics, so r and d hit their clips.
        x = rng.normal(3.0 - step, 2.5, (16, 3))
        want, state = np_renorm_step(x, gamma, beta, state, clip, 0.9, 0.7)
        np.testing.assert_allclose(run(x.astype(np.float32)), want, rtol=1e-4, atol=1e-4)
    moving_mean, moving_std, renorm_mean, renorm_std = state
    np.testing.assert_allclose(layer.moving_mean, moving_mean, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_stddev, moving_std, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, moving_std ** 2 - EPS,
                               rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.renorm_mean, renorm_mean, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.renorm_stddev, renorm_std, rtol=F32_TOL, atol=F32_TOL)
    # Numeric bounds need no step counter: Keras's seven weights, no more.
    assert not hasattr(layer, "renorm_steps")
    assert [w.name for w in layer.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance", "moving_stddev",
        "renorm_mean", "renorm_stddev"]


def test_renorm_inference_is_plain_batch_norm_with_moving_stats():
    layer, params = _layer(3, renorm=True, renorm_clipping={"rmax": 2.0})
    x = np.random.RandomState(1).normal(1.0, 2.0, (8, 3))
    layer(x.astype(np.float32), training=True)
    want, _, _ = np_batch_norm(x, params[0], params[1], layer.moving_mean.numpy(),
                               layer.moving_variance.numpy(), training=False)
    np.testing.assert_allclose(layer(x.astype(np.float32)), want, rtol=F32_TOL, atol=F32_TOL)


def test_renorm_gradient_treats_r_and_d_as_constants():
    rng = np.random.RandomState(2)
    x = tf.constant(rng.normal(0.5, 2.0, (6, 2)))
    w = tf.constant(rng.normal(0.0, 1.0, (6, 2)))
    layer = BatchNorm(renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.3}, dtype="float64")
    layer.build((None, 2))
    layer.renorm_mean.assign([1.0, -1.0])
    layer.renorm_stddev.assign([0.5, 3.0])
    gamma, beta = layer.gamma, layer.beta

    def reference(x):
        # The paper's formula with r and d under stop_gradient, by autodiff.
        mean, var = tf.nn.moments(x, [0])
        std = tf.sqrt(var + EPS)
        r = tf.stop_gradient(tf.clip_by_value(std / [0.5, 3.0], 0.0, 1.2))
        d = tf.stop_gradient(tf.clip_by_value((mean - [1.0, -1.0]) / [0.5, 3.0], -0.3, 0.3))
        return gamma * ((x - mean) / std * r + d) + beta

    grads = []
    for f in (lambda x: layer(x, training=True), reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(w * f(x))
        grads.append(tape.gradient(loss, [x, gamma, beta]))
    for ours, ref in zip(*grads):
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)


def test_renorm_clipping_schedules_widen_with_the_step(tmp_path):
    # rmax 1 (no correction of r) for the first 2 steps, then 3; dmax grows
    # linearly from 0. A Keras schedule and a plain callable.
    rmax = keras.optimizers.schedules.PiecewiseConstantDecay([1.5], [1.0, 3.0])
    layer, _ = _layer(1, renorm=True, renorm_clipping={"rmax": rmax, "rmin": 0.0,
                                                         "dmax": lambda step: 0.1 * step})
    layer.renorm_stddev.assign([0.1])  # batch std ~2: r wants ~20
    x = np.random.RandomState(3).normal(1.0, 2.0, (32, 1)).astype(np.float32)
    seen = []
    for step in range(4):
        r, d = layer._renorm_correction(tf.float32)(
            tf.constant([[1.0]]), tf.constant([[4.0]]), lambda v: tf.reshape(v, [1, -1]))
        seen.append((float(r[0, 0]), float(d[0, 0])))
        layer.renorm_steps.assign(step + 1)
    assert [r for r, _ in seen] == [1.0, 1.0, 3.0, 3.0]
    np.testing.assert_allclose([abs(d) for _, d in seen], [0.0, 0.1, 0.2, 0.3], rtol=1e-6)
    # The Keras schedule survives a .keras round trip; the lambda does not
    # need to (it is saved by Keras's rules for lambdas).
    layer2, _ = _layer(1, renorm=True, renorm_clipping={"rmax": rmax})
    loaded = _round_trip(layer2, tmp_path, x)
    assert isinstance(loaded.renorm_clipping["rmax"],
                      keras.optimizers.schedules.PiecewiseConstantDecay)


def test_renorm_round_trip_keeps_renorm_weights(tmp_path):
    layer, _ = _layer(3, renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0})
    x = np.random.RandomState(4).normal(1.0, 2.0, (8, 3)).astype(np.float32)
    layer(x, training=True)
    loaded = _round_trip(layer, tmp_path, x)
    np.testing.assert_array_equal(loaded.renorm_stddev.numpy(), layer.renorm_stddev.numpy())


# --- ghost batches --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,axis", [((12, 3), -1), ((8, 2, 2, 3), -1), ((8, 3, 2, 2), 1)])
def test_ghost_batches_match_reference(mode, shape, axis):
    v = 4
    layer, params = _layer(3, shape=(None,) + shape[1:], axis=axis, virtual_batch_size=v,
                           momentum=0.5)
    x = np.random.RandomState(5).normal(1.0, 2.0, shape)
    parts = [np_batch_norm(x[i:i + v], *params, training=True, momentum=0.0, axis=axis)
             for i in range(0, shape[0], v)]
    want_y = np.concatenate([p[0] for p in parts])
    want_mean = 0.5 * params[2] + 0.5 * np.mean([p[1] for p in parts], axis=0)
    want_var = 0.5 * params[3] + 0.5 * np.mean([p[2] for p in parts], axis=0)
    y = _runner(layer, mode)(x.astype(np.float32))
    np.testing.assert_allclose(y, want_y, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_mean, want_mean, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, want_var, rtol=F32_TOL, atol=F32_TOL)


def test_ghost_batch_gradient_matches_finite_differences():
    rng = np.random.RandomState(6)
    x = tf.constant(rng.normal(0.0, 1.0, (6, 2, 2)))
    w = tf.constant(rng.normal(0.0, 1.0, (6, 2, 2)))
    layer = BatchNorm(virtual_batch_size=3, dtype="float64")
    layer.build((None, 2, 2))
    layer.gamma.assign([1.5, 0.5])

    def f(x):
        return tf.reduce_sum(w * layer(x, training=True) ** 2)

    theoretical, numerical = tf.test.compute_gradient(f, [x])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-6)


def test_ghost_batch_size_not_a_multiple_is_an_error():
    layer = BatchNorm(virtual_batch_size=4, name="ghost")
    layer.build((None, 3))
    with pytest.raises(ValueError) as info:
        layer(np.zeros((6, 3), np.float32), training=True)
    assert ("BatchNorm 'ghost': the batch size must be a multiple of "
            "virtual_batch_size=4; received a batch of 6.") in str(info.value)
    step = tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        step(np.zeros((6, 3), np.float32))
    assert "must be a multiple of virtual_batch_size=4" in str(info.value)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))


def test_ghost_batch_round_trip(tmp_path):
    layer, _ = _layer(3, virtual_batch_size=2)
    x = np.random.RandomState(7).normal(0.0, 1.0, (4, 3)).astype(np.float32)
    layer(x, training=True)
    assert _round_trip(layer, tmp_path, x).virtual_batch_size == 2


# --- cumulative average (momentum=None) -----------------------------------


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("mode", MODES)
def test_cumulative_average_is_the_mean_of_batch_statistics(mode):
    layer, _ = _layer(3, momentum=None)
    run = _runner(layer, mode)
    rng = np.random.RandomState(8)
    batches = [rng.normal(i, 1.0 + i, (10, 3)) for i in range(5)]
    for x in batches:
        run(x.astype(np.float32))
    np.testing.assert_allclose(layer.moving_mean, np.mean([b.mean(0) for b in batches], 0),
                               rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, np.mean([b.var(0) for b in batches], 0),
                               rtol=F32_TOL, atol=F32_TOL)
    assert int(layer.num_batches_tracked.numpy()) == 5


def test_cumulative_average_counter_is_saved_with_the_weights(tmp_path):
    layer, _ = _layer(2, momentum=None)
    x = np.random.RandomState(9).normal(0.0, 1.0, (4, 2)).astype(np.float32)
    for _ in range(3):
        layer(x, training=True)
    assert [w.name for w in layer.weights][-1] == "num_batches_tracked"
    loaded = _round_trip(layer, tmp_path, x)
    assert int(loaded.num_batches_tracked.numpy()) == 3
    assert loaded.momentum is None


# --- unbiased moving variance ---------------------------------------------


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("mode", MODES)
def test_unbiased_moving_variance(mode):
    layer, params = _layer(3, shape=(None, 2, 2, 3), unbiased_moving_variance=True)
    x = np.random.RandomState(10).normal(1.0, 2.0, (5, 2, 2, 3))
    y = _runner(layer, mode)(x.astype(np.float32))
    n = 5 * 2 * 2
    want = np_batch_norm(x, *params, training=True)  # normalizes with the biased one
    np.testing.assert_allclose(y, want[0], rtol=F32_TOL, atol=F32_TOL)
    unbiased = x.reshape(-1, 3).var(0, ddof=1)
    np.testing.assert_allclose(layer.moving_variance, 0.9 * params[3] + 0.1 * unbiased,
                               rtol=F32_TOL, atol=F32_TOL)
    assert n / (n - 1) * x.reshape(-1, 3).var(0) == pytest.approx(unbiased)


def test_unbiased_moving_variance_matches_torch_running_var():
    torch = pytest.importorskip("torch")
    torch_bn = torch.nn.BatchNorm2d(3).double().train()
    layer = BatchNorm(axis=1, unbiased_moving_variance=True, dtype="float64")
    layer.build((None, 3, 4, 4))
    rng = np.random.RandomState(11)
    for _ in range(3):
        x = rng.normal(0.5, 2.0, (4, 3, 4, 4))
        torch_bn(torch.from_numpy(x))
        layer(x, training=True)
    np.testing.assert_allclose(layer.moving_variance, torch_bn.running_var.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_mean, torch_bn.running_mean.numpy(), rtol=1e-12)


def test_unbiased_with_one_value_per_channel_skips_the_update():
    layer, params = _layer(2, unbiased_moving_variance=True)
    layer(np.ones((1, 2), np.float32), training=True)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), params[3])
    assert layer.refused_batches == 1


# --- bad-batch guard ------------------------------------------------------


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", ["nan", "inf", "empty"])
def test_guard_leaves_moving_stats_exactly_as_they_were(mode, bad):
    layer, params = _layer(3, shape=(None, 2, 3))
    run = _runner(layer, mode)
    x = np.random.RandomState(12).normal(0.0, 1.0, (4, 2, 3)).astype(np.float32)
    if bad == "empty":
        x = x[:0]
    else:
        x[1, 0, 2] = np.nan if bad == "nan" else np.inf
    before = [w.copy() for w in layer.get_weights()]
    y = run(x)
    assert y.shape == x.shape  # the output is whatever the math gives
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert layer.refused_batches == 1
    good = np.random.RandomState(13).normal(0.0, 1.0, (4, 2, 3)).astype(np.float32)
    run(good)
    assert layer.refused_batches == 1
    assert not np.array_equal(layer.moving_mean.numpy(), before[2])


def test_guard_off_lets_nan_through_and_counts_nothing():
    layer, _ = _layer(2, guard_bad_batches=False)
    layer(np.array([[np.nan, 1.0], [2.0, 3.0]], np.float32), training=True)
    assert np.isnan(layer.moving_mean.numpy()[0])
    assert layer.refused_batches == 0


def test_guard_protects_cumulative_and_renorm_statistics():
    layer, _ = _layer(2, momentum=None, renorm=True)
    layer(np.random.RandomState(14).normal(0, 1, (4, 2)).astype(np.float32), training=True)
    before = [w.copy() for w in layer.get_weights()]
    layer(np.full((4, 2), np.nan, np.float32), training=True)
    after = layer.get_weights()
    names = [w.name for w in layer.weights]
    for name, a, b in zip(names, after, before):
        if name != "renorm_steps":
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert int(layer.num_batches_tracked.numpy()) == 1


@pytest.mark.usefixtures("both_paths")
def test_batch_of_one_value_per_channel_is_allowed():
    layer, params = _layer(2, momentum=0.5)
    x = np.array([[3.0, -1.0]], np.float32)
    y = layer(x, training=True)
    np.testing.assert_allclose(y, [params[1]], atol=F32_TOL)  # x - mean = 0: y = beta
    np.testing.assert_allclose(layer.moving_mean, 0.5 * params[2] + 0.5 * x[0], rtol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, 0.5 * params[3], rtol=F32_TOL)
    assert layer.refused_batches == 0


# --- masks ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_mask_excludes_positions_from_the_statistics(mode):
    layer, params = _layer(3, shape=(None, 5, 3), momentum=0.0)
    rng = np.random.RandomState(15)
    x = rng.normal(1.0, 2.0, (4, 5, 3))
    mask = rng.rand(4, 5) > 0.4
    x[~mask] = 1e3  # padding that would wreck the statistics if counted
    kept = x[mask]
    mean, var = kept.mean(0), kept.var(0)
    want = params[0] * (x - mean) / np.sqrt(var + EPS) + params[1]
    y = _runner(layer, mode)(x.astype(np.float32), mask=tf.constant(mask))
    np.testing.assert_allclose(y.numpy()[mask], want[mask], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=F32_TOL, atol=1e-4)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-4, atol=1e-4)


def test_mask_gradient_matches_finite_differences():
    rng = np.random.RandomState(16)
    x = tf.constant(rng.normal(0.0, 1.0, (3, 4, 2)))
    w = tf.constant(rng.normal(0.0, 1.0, (3, 4, 2)))
    mask = tf.constant(rng.rand(3, 4) > 0.3)
    layer = BatchNorm(dtype="float64")
    layer.build((None, 4, 2))

    def f(x):
        return tf.reduce_sum(w * layer(x, training=True, mask=mask) ** 2)

    theoretical, numerical = tf.test.compute_gradient(f, [x])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-6)


def test_embedding_mask_zero_reaches_the_layer_in_a_model():
    tokens = np.array([[3, 5, 0, 0], [7, 0, 0, 0], [2, 4, 6, 8]])
    emb = keras.layers.Embedding(10, 3, mask_zero=True)
    bn = BatchNorm(momentum=0.0)
    model = keras.Sequential([keras.Input((4,), dtype="int32"), emb, bn])
    model(tokens, training=True)
    vectors = emb(tokens).numpy()[tokens != 0]
    np.testing.assert_allclose(bn.moving_mean, vectors.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance, vectors.var(0), rtol=1e-4, atol=1e-7)


def _keras_twin(layer, shape, **kwargs):
    """keras.layers.BatchNormalization with `layer`'s arguments and weights."""
    twin = keras.layers.BatchNormalization(
        axis=layer.axis, momentum=layer.momentum, epsilon=layer.epsilon, **kwargs)
    twin.build(shape)
    twin.set_weights(layer.get_weights())
    return twin


@pytest.mark.parametrize("axis, mask_shape", [
    (-1, (2, 3, 4)),   # Keras's usual mask: the input's shape without the last axis
    (1, (2, 3, 4)),    # the same after `Masking` on channels-first data
    (1, (1, 3, 1)),    # Keras's "broadcastable" form (size-1 axes)
    (-1, (2, 1, 4)),
    (2, (2, 3, 4, 1)),  # full rank, broadcast as it is
])
def test_keras_mask_conventions_give_keras_statistics(axis, mask_shape):
    # Keras's layer expands a mask of rank r - 1 at the last axis and
    # broadcasts it to the input, whatever `axis` is; so must we.
    rng = np.random.RandomState(17)
    shape = (2, 3, 4, 5)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    mask = rng.rand(*mask_shape) > 0.3
    layer = BatchNorm(axis=axis, momentum=0.5, epsilon=1e-3)
    layer.build(shape)
    twin = _keras_twin(layer, shape)
    # Keras takes rank r - 1 only: it gets a full-rank mask without its last axis.
    keras_mask = mask if len(mask_shape) < len(shape) else mask[..., 0]
    ours = layer(x, training=True, mask=mask)
    theirs = twin(x, training=True, mask=keras_mask)
    # Keras divides by count + 1e-7; relative differences stay below 1e-5.
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean, twin.moving_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, twin.moving_variance, rtol=1e-5, atol=1e-5)


def test_channels_first_mask_after_masking_is_accepted_in_inference():
    layer = BatchNorm(axis=1)
    x = np.ones((2, 3, 4), np.float32)
    layer.build(x.shape)
    # Masking's mask: (2, 3), the input without its last axis.
    np.testing.assert_array_equal(layer(x, mask=np.ones((2, 3), bool)), layer(x))


def test_mask_shape_error():
    layer = BatchNorm(name="bn_m")
    layer.build((None, 5, 3))
    with pytest.raises(ValueError) as info:
        layer(np.zeros((2, 5, 3), np.float32), training=True, mask=np.ones((2, 4), bool))
    assert ("BatchNorm 'bn_m': argument `mask` must broadcast to the input's shape "
            "(2, 5, 3), or do so once given a last axis of size 1 (Keras's masks lack "
            "the last axis); received shape (2, 4).") in str(info.value)
    before = layer.get_weights()
    with pytest.raises(ValueError):
        layer(np.zeros((2, 5, 3), np.float32), training=True, mask=np.ones((2, 5, 3, 1), bool))
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_fully_masked_batch_is_refused_by_the_guard():
    layer, params = _layer(3, shape=(None, 5, 3))
    layer(np.ones((2, 5, 3), np.float32), training=True, mask=np.zeros((2, 5), bool))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), params[2])
    assert layer.refused_batches == 1


# --- configuration --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"virtual_batch_size": 0},
         "BatchNorm 'bn': argument `virtual_batch_size` must be None or an integer >= 1; "
         "received virtual_batch_size=0."),
        ({"virtual_batch_size": 4, "synchronized": True},
         "BatchNorm 'bn': arguments `virtual_batch_size` and `synchronized=True` don't "
         "combine (ghost batches are per-replica by definition); received "
         "virtual_batch_size=4, synchronized=True."),
        ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmean": 1.0}},
         "BatchNorm 'bn': argument `renorm_clipping` must be a dict with keys among "
         "('rmax', 'rmin', 'dmax'); received renorm_clipping={'rmax': 2.0, 'rmean': 1.0}."),
        ({"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}},
         "BatchNorm 'bn': renorm_clipping needs rmin <= rmax; received rmin=2.0, rmax=0.5."),
        ({"renorm": True, "renorm_clipping": {"dmax": -1}},
         "BatchNorm 'bn': renorm_clipping['dmax'] must be a number >= 0, a Keras "
         "LearningRateSchedule or a callable of the step; received -1."),
        ({"renorm_clipping": {"rmax": 2.0}},
         "BatchNorm 'bn': argument `renorm_clipping` needs renorm=True; received "
         "renorm_clipping={'rmax': 2.0} with renorm=False."),
        ({"renorm": True, "renorm_momentum": 2.0},
         "BatchNorm 'bn': argument `renorm_momentum` must be a number in "
         "[0, 1]; received renorm_momentum=2.0."),
    ],
)
def test_feature_argument_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        BatchNorm(name="bn", **kwargs)
    assert str(info.value) == message


def test_defaults_keep_four_keras_compatible_weights():
    layer = BatchNorm()
    layer.build((None, 2))
    config = layer.get_config()
    assert (config["renorm"], config["virtual_batch_size"], config["momentum"],
            config["unbiased_moving_variance"], config["guard_bad_batches"]) == (
        False, None, 0.9, False, True)
    assert len(layer.get_weights()) == 4


def test_renorm_in_graph_reads_its_statistics_before_updating_them():
    # Grappler once let the renorm update overtake the forward pass's read
    # (run-to-run different outputs); the same state must give the eager
    # output every time.
    layer, _ = _layer(3, renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.8, "dmax": 0.5})
    layer.renorm_mean.assign([1.0, 0.5, -0.5])
    layer.renorm_stddev.assign([2.0, 1.5, 2.5])
    state = layer.get_weights()
    x = np.random.RandomState(17).normal(1.5, 2.0, (16, 3)).astype(np.float32)
    want = layer(x, training=True).numpy()
    step = tf.function(lambda x: layer(x, training=True))
    outputs = []
    for _ in range(8):
        layer.set_weights(state)
        outputs.append(step(x).numpy())
        # Graph arithmetic may round differently from eager (a few ulps);
        # the race moved outputs by 0.1 and more.
        np.testing.assert_allclose(outputs[-1], want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(outputs[-1], outputs[0])
