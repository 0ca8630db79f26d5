"""recalibrate: exact population statistics, for both layer types, with every
other piece of state left as it was."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from keras_bn import recalibrate
from tests.model_helpers import needs_keras_renorm

# The statistics come from float32 forward passes over O(1) activations and
# are pooled in float64; 1e-4 covers float32 rounding of the activations.
STATS_TOL = 1e-4


def _stats(layer):
    return layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()


def _one_layer(momentum=0.99):
    model = keras.Sequential([keras.Input((2,)), BatchNorm(momentum=momentum)])
    bn = model.layers[0]
    bn.moving_mean.assign([5.0, -5.0])
    bn.moving_variance.assign([9.0, 0.1])
    return model, bn


# Three rows of (0, 1), then one of (4, 9): population means (1, 3) and
# variances (3, 12), exact in float32. The unweighted mean of the two batch
# means would be (2, 5): the partial batch must count once, not three times.
SMALL = [np.array([[0, 1], [0, 1], [0, 1]], np.float32), np.array([[4, 9]], np.float32)]


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_hand_computed_population_statistics_weighted_by_batch_size(policy):
    keras.mixed_precision.set_global_policy(policy)  # 0, 1, 4, 9 are exact in float16
    model, bn = _one_layer()
    recalibrate(model, SMALL, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [1.0, 3.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [3.0, 12.0])
    assert bn.momentum == 0.99


class _Block(keras.layers.Layer):
    """A custom layer holding its batch norm as an attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization(momentum=0.9)

    def call(self, x, training=None):
        return self.norm(x, training=training)


def test_finds_layers_inside_custom_layers():
    model = keras.Sequential([keras.Input((2,)), _Block()])
    recalibrate(model, SMALL, verbose=0)
    bn = model.layers[0].norm
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [1.0, 3.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [3.0, 12.0])
    assert bn.momentum == 0.9


@pytest.mark.parametrize("form", ["list of x", "(x, y) pairs", "(x,) tuples", "dataset of (x, y)"])
def test_data_forms_use_only_x(form):
    model, bn = _one_layer()
    y = [np.full((len(x), 7), 100.0, np.float32) for x in SMALL]
    data = {
        "list of x": SMALL,
        "(x, y) pairs": ((x, t) for x, t in zip(SMALL, y)),
        "(x,) tuples": [(x,) for x in SMALL],
        "dataset of (x, y)": tf.data.Dataset.from_tensor_slices(
            (np.concatenate(SMALL), np.concatenate(y))).batch(3),
    }[form]
    report = recalibrate(model, data, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [1.0, 3.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [3.0, 12.0])
    assert (report.batches, report.examples) == (2, 4)


def test_steps_limits_the_batches():
    model, bn = _one_layer()
    batches = iter(SMALL)
    report = recalibrate(model, batches, steps=1, verbose=0)
    assert next(batches) is SMALL[1]  # not drawn from the iterator
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0, 1.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [0.0, 0.0])
    assert (report.batches, report.examples) == (1, 3)


def test_large_offset_keeps_the_variance():
    # 1e4 + N(0, 1): a pooled E[x^2] - E[x]^2 without the shift would lose
    # half the float64 digits; the float32 batch statistics limit the rest.
    model, bn = _one_layer()
    x = np.random.RandomState(0).normal(1e4, 1.0, (40, 2))
    recalibrate(model, np.split(x.astype(np.float32), 4), verbose=0)
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x32.mean(0), rtol=1e-7)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x32.var(0), rtol=1e-3)


def _nested_model():
    """An outer model holding an inner functional one; both layer types.

    Returns the model, its three batch-norm layers, and a probe whose
    outputs are the inputs of those layers (sharing the model's layers)."""
    inputs = keras.Input((5, 5, 2))
    a1 = keras.layers.Conv2D(3, 3, use_bias=False)(inputs)
    h = BatchNorm(momentum=0.99, name="bn_ours")(a1)
    a2 = keras.layers.Conv2D(4, 2, activation="relu")(h)
    h = keras.layers.BatchNormalization(name="bn_keras")(a2)
    inner = keras.Model(inputs, h, name="inner")
    outer_in = keras.Input((5, 5, 2))
    a3 = keras.layers.Dense(3)(keras.layers.Flatten()(inner(outer_in)))
    out = BatchNorm(name="bn_head")(a3)
    model = keras.Model(outer_in, out, name="outer")
    inner_probe = keras.Model(inputs, [a1, a2])
    head_probe = keras.Model(outer_in, a3)

    def probe(x):
        return [*inner_probe(x, training=True), head_probe(x, training=True)]

    layers = [inner.get_layer("bn_ours"), inner.get_layer("bn_keras"), model.get_layer("bn_head")]
    return model, layers, probe


@pytest.fixture(scope="module")
def calibration_data():
    rng = np.random.RandomState(1)
    x = rng.normal(0.5, 2.0, (50, 5, 5, 2)).astype(np.float32)
    y = rng.randint(0, 3, 50)
    return x, y


def test_equals_statistics_of_the_activations_in_nested_models(calibration_data):
    x, y = calibration_data
    model, layers, probe = _nested_model()
    model.compile("adam", "mse")
    model.fit(x, np.zeros((50, 3)), batch_size=16, epochs=1, verbose=0)  # a traced train step
    # 50 = 16 + 16 + 16 + 2: the partial last batch counts with its size.
    report = recalibrate(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16), verbose=0)
    got = [_stats(layer) for layer in layers]
    activations = [[], [], []]
    for i in range(0, 50, 16):
        for store, a in zip(activations, probe(x[i:i + 16])):
            store.append(a.numpy().astype(np.float64))
    for (mean, var), store in zip(got, activations):
        a = np.concatenate(store)
        a = a.reshape(-1, a.shape[-1])
        np.testing.assert_allclose(mean, a.mean(0), atol=STATS_TOL, rtol=STATS_TOL)
        np.testing.assert_allclose(var, a.var(0), atol=STATS_TOL, rtol=STATS_TOL)
    assert sorted(report.layers) == ["bn_head", "bn_keras", "bn_ours"]
    assert (report.batches, report.examples, report.frozen) == (4, 50, ())


def test_changes_nothing_but_the_moving_statistics(calibration_data):
    x, y = calibration_data
    model = keras.Sequential([
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(3, 3, use_bias=False),
        BatchNorm(momentum=0.99),
        keras.layers.Dropout(0.5),  # its seed-generator state must come back
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    bn = model.layers[1]
    statistics = {id(bn.moving_mean), id(bn.moving_variance)}
    others = [v for v in model.variables + model.optimizer.variables if id(v) not in statistics]
    before = [v.numpy().copy() for v in others]
    config = bn.get_config()
    old_mean, _ = _stats(bn)
    recalibrate(model, [x[:25], x[25:]], verbose=0)
    assert not np.allclose(bn.moving_mean.numpy(), old_mean)
    assert bn.get_config() == config
    for v, value in zip(others, before):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)


def test_later_training_uses_the_restored_momentum():
    # A train step traced before recalibrating must still average with
    # momentum 0.5, and so must one traced after.
    model, bn = _one_layer(momentum=0.5)
    model.compile("sgd", "mse")
    batch = np.array([[2.0, 2.0], [4.0, 6.0]], np.float32)
    model.fit(batch, batch, batch_size=2, epochs=1, verbose=0)
    recalibrate(model, SMALL, verbose=0)
    model.fit(batch, batch, batch_size=2, epochs=1, verbose=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), [0.5 * 1 + 0.5 * 3, 0.5 * 3 + 0.5 * 4])
    np.testing.assert_allclose(bn.moving_variance.numpy(), [0.5 * 3 + 0.5 * 1, 0.5 * 12 + 0.5 * 4])


def test_an_error_restores_momentum_and_statistics():
    model, bn = _one_layer()

    def batches():
        yield SMALL[0]
        raise RuntimeError("the input pipeline broke")

    before = _stats(bn)
    with pytest.raises(RuntimeError, match="the input pipeline broke"):
        recalibrate(model, batches(), verbose=0)
    assert bn.momentum == 0.99
    np.testing.assert_array_equal(_stats(bn)[0], before[0])
    np.testing.assert_array_equal(_stats(bn)[1], before[1])


def test_frozen_layers_keep_their_statistics_and_are_reported():
    model = keras.Sequential([
        keras.Input((2,)), BatchNorm(name="frozen"), BatchNorm(name="free")])
    model.layers[0].trainable = False
    model.layers[0].moving_mean.assign([7.0, 7.0])
    report = recalibrate(model, SMALL, verbose=0)
    np.testing.assert_array_equal(model.layers[0].moving_mean.numpy(), [7.0, 7.0])
    assert report.layers == ("free",) and report.frozen == ("frozen",)
    assert str(report) == (
        "recalibrated 1 batch-norm layers over 2 batches (4 examples); left 1 frozen alone")


def test_progress_bar(capsys):
    model, _ = _one_layer()
    recalibrate(model, SMALL, verbose=2)
    assert "2/2" in capsys.readouterr().out
    recalibrate(model, SMALL, verbose=0)
    assert capsys.readouterr().out == ""


def _message(call):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return str(info.value)


def test_errors_name_the_argument():
    model, _ = _one_layer()
    x = np.zeros((8, 2), np.float32)
    assert _message(lambda: recalibrate(model, x)) == (
        "recalibrate: argument `data` must yield batches (a tf.data.Dataset or an iterable of "
        "batches); received a single array of shape (8, 2). Batch it first, e.g. "
        "tf.data.Dataset.from_tensor_slices(x).batch(64).")
    assert _message(lambda: recalibrate(model, SMALL, steps=0)) == (
        "recalibrate: argument `steps` must be None or an integer >= 1; received steps=0.")
    assert _message(lambda: recalibrate(model, [], verbose=0)) == (
        "recalibrate: argument `data` must yield at least one batch; received an empty one.")
    infinite = tf.data.Dataset.from_tensors(x).repeat()
    assert _message(lambda: recalibrate(model, infinite)) == (
        "recalibrate: argument `steps` is required when `data` is an infinite dataset (e.g. one "
        "that repeats); received steps=None.")
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)], name="plain")
    assert _message(lambda: recalibrate(plain, SMALL)) == (
        "recalibrate: argument `model` must contain a keras_bn.BatchNorm or "
        "keras.layers.BatchNormalization layer; received 'plain', which has none.")
    unbuilt = keras.Sequential([BatchNorm(name="bn")], name="unbuilt")
    assert _message(lambda: recalibrate(unbuilt, SMALL)) == (
        "recalibrate: argument `model` must be built (call it on a batch first); received "
        "'unbuilt', whose layer 'bn' has no weights yet.")
    model.trainable = False
    assert _message(lambda: recalibrate(model, SMALL)) == (
        f"recalibrate: argument `model` must have a trainable batch-norm layer; received "
        f"{model.name!r}, whose 1 batch-norm layers are all frozen (trainable=False) and keep "
        "their statistics.")


def test_unbiased_layer_gets_the_unbiased_population_variance():
    # 4 values per channel: variances (3, 12) become (4, 16) with 4 / 3.
    model = keras.Sequential([keras.Input((2,)), BatchNorm(unbiased_moving_variance=True)])
    bn = model.layers[0]
    recalibrate(model, SMALL, verbose=0)
    np.testing.assert_allclose(bn.moving_variance.numpy(), [4.0, 16.0], rtol=1e-6)
    assert bn.unbiased_moving_variance  # restored


def test_cumulative_layer_counts_the_batches_averaged():
    model, bn = _one_layer(momentum=None)
    recalibrate(model, SMALL, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [1.0, 3.0])
    assert int(bn.num_batches_tracked.numpy()) == 2
    assert bn.momentum is None


def test_batches_refused_by_the_guard_do_not_count():
    model, bn = _one_layer()
    data = [SMALL[0], np.array([[np.nan, 1.0]], np.float32), SMALL[1]]
    recalibrate(model, data, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [1.0, 3.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [3.0, 12.0])
    assert bn.refused_batches == 0  # its counter is restored too


@pytest.mark.parametrize("cls", [BatchNorm, pytest.param(
    keras.layers.BatchNormalization, marks=needs_keras_renorm)])
def test_renorm_layers_are_recalibrated(cls):
    # Ours and Keras's: the population mean and variance, and the moving
    # stddev inference divides by, sqrt(variance + epsilon), with them.
    model = keras.Sequential([keras.Input((2,)), cls(renorm=True, epsilon=1e-3)])
    bn = model.layers[0]
    renorm_before = [bn.renorm_mean.numpy(), bn.renorm_stddev.numpy()]
    recalibrate(model, SMALL, verbose=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), [1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), [3.0, 12.0], rtol=1e-6)
    np.testing.assert_allclose(bn.moving_stddev.numpy(), np.sqrt([3.001, 12.001]), rtol=1e-6)
    # The training-time renorm statistics are not population statistics:
    # they stay as they were.
    for before, variable in zip(renorm_before, [bn.renorm_mean, bn.renorm_stddev]):
        np.testing.assert_array_equal(variable.numpy(), before)
