"""Bad inputs: each gives a clear error or a documented result, and leaves
the moving statistics bit for bit as they were (unless the documented
result is an update, as for integer inputs).

Errors raised inside `call()` reach the user wrapped by Keras ("Exception
encountered when calling BatchNorm.call()..."); there the whole of our
message must be in Keras's. Errors from Keras, TensorFlow, zipfile or h5py
(saving and loading) are checked as they are today, so that a change in
them shows up here.
"""

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm
from tests.reference import np_batch_norm
from tests.reference import random_params

F32_TOL = 1e-5  # see tests/test_ops.py


def _layer(channels=3, **kwargs):
    """A built layer named "bn" whose weights are away from their defaults."""
    layer = BatchNorm(name="bn", **kwargs)
    layer.build((None, channels))
    params = [p.astype(np.float32) for p in random_params(channels)]
    layer.set_weights(params + layer.get_weights()[4:])
    return layer, params


def _moving(layer):
    return [layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()]


def _assert_untouched(layer, before):
    """The moving statistics are bit for bit `before`."""
    for now, then in zip(_moving(layer), before):
        np.testing.assert_array_equal(now, then)


def _x(shape=(4, 3), seed=0):
    return np.random.RandomState(seed).normal(0.5, 2.0, shape).astype(np.float32)


# --- dtypes ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [tf.int8, tf.int32, tf.int64, tf.uint8, tf.bool])
def test_integer_and_bool_inputs_are_cast_and_update_like_floats(dtype):
    # Documented: cast to the compute dtype, as Keras's layer does; the
    # result, moving statistics included, is that of the cast input.
    values = np.random.RandomState(1).randint(0, 2 if dtype == tf.bool else 9, (5, 3))
    ours, _ = _layer()
    cast, _ = _layer()
    y = ours(tf.cast(values, dtype), training=True)
    want = cast(tf.constant(values, tf.float32), training=True)
    assert y.dtype == tf.float32
    np.testing.assert_array_equal(y, want)
    for a, b in zip(_moving(ours), _moving(cast)):
        np.testing.assert_array_equal(a, b)  # the same update, bit for bit


@pytest.mark.parametrize("dtype", [tf.string, tf.complex64])
def test_non_real_inputs_are_refused(dtype):
    layer, _ = _layer()
    before = _moving(layer)
    x = tf.constant([["a", "b", "c"]]) if dtype == tf.string else tf.complex(_x(), _x())
    with pytest.raises(TypeError) as info:
        layer(x, training=True)
    assert (f"BatchNorm 'bn': expected a real-valued (float, integer or bool) input tensor; received dtype "
            f"{dtype.name}.") in str(info.value)
    _assert_untouched(layer, before)


# --- shapes ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), ()])
def test_rank_below_two_is_refused(shape):
    layer, _ = _layer()
    before = _moving(layer)
    with pytest.raises(ValueError) as info:
        layer(tf.ones(shape), training=True)
    assert (f"BatchNorm 'bn': expected an input of rank >= 2 (batch and channels); "
            f"received rank {len(shape)}.") in str(info.value)
    _assert_untouched(layer, before)


def test_channel_mismatch_is_refused():
    layer, _ = _layer()
    before = _moving(layer)
    with pytest.raises(ValueError) as info:
        layer(tf.ones([2, 5, 4]), training=True)
    assert ("BatchNorm 'bn' was built for 3 channels on axis -1; received an input "
            "with 4 channels (shape (2, 5, 4)).") in str(info.value)
    _assert_untouched(layer, before)


def test_unknown_channel_dimension_at_build_is_refused():
    with pytest.raises(ValueError) as info:
        BatchNorm(name="bn").build((None, 5, None))
    assert str(info.value) == (
        "BatchNorm 'bn': the channel dimension (axis -1) of the input must be known "
        "at build time; received input shape (None, 5, None).")


def test_unknown_rank_is_refused_when_traced():
    layer, _ = _layer()
    step = tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(ValueError) as info:
        step.get_concrete_function()
    assert ("BatchNorm 'bn': the input rank must be known; received an input of "
            "unknown rank.") in str(info.value)


def _unknown_channels_step(layer, training=True):
    return tf.function(lambda x: layer(x, training=training),
                       input_signature=[tf.TensorSpec([None, None], tf.float32)])


@pytest.mark.parametrize("fused", [True, False])
def test_unknown_channel_dimension_in_a_graph_computes_as_eagerly(fused):
    # Documented: only the channel count is fixed, so a graph traced for
    # any number of channels serves inputs with the built one.
    layer, _ = _layer(fused=fused)
    twin, _ = _layer(fused=fused)
    x = _x()
    np.testing.assert_allclose(_unknown_channels_step(layer)(x), twin(x, training=True),
                               rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(_moving(layer), _moving(twin), rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_unknown_channel_dimension_mismatch_at_run_time_leaves_statistics(fused, training):
    layer, _ = _layer(fused=fused)
    before = _moving(layer)
    with pytest.raises(tf.errors.InvalidArgumentError):
        _unknown_channels_step(layer, training)(tf.ones([2, 4]))
    _assert_untouched(layer, before)


@pytest.mark.parametrize("fused", [True, False])
def test_unknown_channel_dimension_mismatch_at_run_time_names_the_layer(fused):
    layer, _ = _layer(fused=fused)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _unknown_channels_step(layer)(tf.ones([2, 4]))
    # TensorFlow's Assert escapes quotes and shortens long messages: the
    # layer's name and the built channel count must be in what is left.
    message = str(info.value).replace("\\'", "'")
    assert "BatchNorm 'bn' was built for 3 channels on axis -1" in message


# --- composite tensors ----------------------------------------------------


def _ragged():
    return tf.ragged.constant([[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]],
                              ragged_rank=1)


def _sparse():
    return tf.sparse.from_dense(tf.constant([[1.0, 0.0, 3.0], [0.0, 2.0, 0.0]]))


@pytest.mark.parametrize("make", [_ragged, _sparse])
def test_ragged_and_sparse_inputs_leave_statistics(make):
    layer, _ = _layer()
    before = _moving(layer)
    with pytest.raises((TypeError, ValueError)):
        layer(make(), training=True)
    _assert_untouched(layer, before)


def test_ragged_input_is_refused_with_the_way_out():
    layer, _ = _layer()
    with pytest.raises(TypeError) as info:
        layer(_ragged(), training=True)
    assert ("BatchNorm 'bn': expected a dense tensor; received a RaggedTensor. Pad it "
            "with `x.to_tensor()` and pass `mask=` to keep the padding out of the batch "
            "statistics.") in str(info.value)


def test_sparse_input_is_refused_with_the_way_out():
    layer, _ = _layer()
    with pytest.raises(TypeError) as info:
        layer(_sparse(), training=True)
    assert ("BatchNorm 'bn': expected a dense tensor; received a SparseTensor. Convert "
            "it with `tf.sparse.to_dense(x)` first.") in str(info.value)


# --- batch contents -------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_training_batch_is_refused_by_the_guard(fused, bad):
    layer, params = _layer(fused=fused)
    before = _moving(layer)
    x = _x((5, 3))
    x[2, 0] = bad
    y = layer(x, training=True).numpy()
    _assert_untouched(layer, before)  # every channel, not just channel 0
    assert layer.refused_batches == 1
    # Documented: the output is what the math gives; channel 0's statistics
    # are not finite, the other channels are normalized as usual.
    assert not np.isfinite(y[:, 0]).any()
    want, _, _ = np_batch_norm(x[:, 1:], *[p[1:] for p in params], training=True)
    np.testing.assert_allclose(y[:, 1:], want, rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_values_in_inference_stay_where_they_are(fused):
    layer, params = _layer(fused=fused)
    before = _moving(layer)
    x = _x((2, 2, 2, 3))
    x[1, 0, 1, 2] = np.nan
    y = layer(x, training=False).numpy()
    assert np.isnan(y[1, 0, 1, 2]) and np.isnan(y).sum() == 1
    want, _, _ = np_batch_norm(x, *params, training=False)
    np.testing.assert_allclose(y, want, rtol=F32_TOL, atol=F32_TOL)  # NaN == NaN here
    _assert_untouched(layer, before)


@pytest.mark.parametrize("shape", [(0, 3), (0, 2, 2, 3), (2, 0, 3)])
@pytest.mark.parametrize("fused", [True, False])
def test_empty_batch_is_refused_by_the_guard(fused, shape):
    layer, _ = _layer(fused=fused)
    before = _moving(layer)
    y = layer(tf.zeros(shape), training=True)
    assert y.shape == shape
    _assert_untouched(layer, before)
    assert layer.refused_batches == 1
    assert layer(tf.zeros(shape), training=False).shape == shape


@pytest.mark.parametrize("fused", [True, False])
def test_batch_of_one_is_its_own_mean(fused):
    # Documented: one value per channel has variance 0, so y = beta and the
    # moving variance decays towards 0; it is not refused.
    layer, params = _layer(fused=fused, momentum=0.5)
    x = np.array([[[[3.0, -1.0, 0.5]]]], np.float32)  # shape (1, 1, 1, 3)
    y = layer(x, training=True)
    np.testing.assert_allclose(y, np.broadcast_to(params[1], x.shape), atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_mean, 0.5 * params[2] + 0.5 * x.ravel(),
                               rtol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, 0.5 * params[3], rtol=F32_TOL)
    assert layer.refused_batches == 0


@pytest.mark.parametrize("fused", [True, False])
def test_float32_values_beyond_float16_overflow_in_a_mixed_float16_layer(fused):
    # Keras casts the input to float16 first: 1e5 becomes inf, and the guard
    # refuses the batch.
    layer, _ = _layer(2, fused=fused, dtype="mixed_float16")
    before = _moving(layer)
    y = layer(np.array([[1e5, 1.0], [2.0, 3.0]], np.float32), training=True)
    assert y.dtype == tf.float16
    assert not np.isfinite(y.numpy()[:, 0]).any()
    _assert_untouched(layer, before)
    assert layer.refused_batches == 1


@pytest.mark.parametrize("fused", [True, False])
def test_float16_values_whose_variance_overflows_float16(fused):
    # +-6e4 are float16 numbers; their variance 3.6e9 is not (max 65504), but
    # statistics and moving statistics are float32, so all of it is finite.
    layer = BatchNorm(fused=fused, momentum=0.5, dtype="float16")
    x = tf.constant([[6e4, 1.0], [-6e4, 3.0]], tf.float16)
    y = layer(x, training=True)
    np.testing.assert_allclose(tf.cast(y, tf.float32), [[1.0, -1.0], [-1.0, 1.0]],
                               atol=2e-3)  # float16 rounding of +-(1 - 1e-5 / var)
    np.testing.assert_allclose(layer.moving_mean, [0.0, 1.0], atol=F32_TOL)
    np.testing.assert_allclose(layer.moving_variance, [0.5 + 0.5 * 3.6e9, 1.0], rtol=F32_TOL)
    assert layer.refused_batches == 0
    # In inference the float32 moving variance 1.8e9 scales a float16 input.
    y = layer(x, training=False)
    np.testing.assert_allclose(tf.cast(y, tf.float32)[:, 0], [6e4 / np.sqrt(1.8e9),
                                                             -6e4 / np.sqrt(1.8e9)],
                               rtol=2e-3)


# --- weights --------------------------------------------------------------


def test_set_weights_of_the_wrong_count_is_refused():
    layer, params = _layer()
    before = _moving(layer)
    with pytest.raises(ValueError) as info:
        layer.set_weights(params[:3])
    assert str(info.value) == (
        "You called `set_weights(weights)` on layer 'bn' with a weight list of length "
        "3, but the layer was expecting 4 weights.")
    _assert_untouched(layer, before)


def test_set_weights_of_the_wrong_shape_is_refused():
    layer, _ = _layer()
    with pytest.raises(ValueError) as info:
        layer.set_weights([np.ones(3, np.float32)] * 3 + [np.ones(4, np.float32)])
    assert str(info.value) == (
        "BatchNorm 'bn': weight 'moving_variance' has shape (3,); received an array of "
        "shape (4,). Nothing was set.")


def test_set_weights_of_the_wrong_shape_changes_nothing():
    layer, params = _layer()
    with pytest.raises(ValueError):
        layer.set_weights([np.ones(3, np.float32)] * 3 + [np.ones(4, np.float32)])
    for now, then in zip(layer.get_weights(), params):
        np.testing.assert_array_equal(now, then)


def _net(channels, name="net"):
    return keras.Sequential([keras.Input((channels,)), BatchNorm(name="bn")], name=name)


def test_load_weights_of_the_wrong_shape_is_refused(tmp_path):
    _net(5).save_weights(tmp_path / "five.weights.h5")
    four = _net(4)
    before = _moving(four.layers[0])
    with pytest.raises(ValueError) as info:
        four.load_weights(tmp_path / "five.weights.h5")
    assert str(info.value) == (
        "A total of 1 objects could not be loaded. Example error message for "
        "object <BatchNorm name=bn, built=True>:\n\n"
        "The shape of the target variable and the shape of the target value in "
        "`variable.assign(value)` must match. variable.shape=(4,), Received: "
        "value.shape=(5,). Target variable: <Variable path=net/bn/gamma, "
        "shape=(4,), dtype=float32, value=[1. 1. 1. 1.]>\n\n"
        "List of objects that could not be loaded:\n"
        "[<BatchNorm name=bn, built=True>]"
    )
    _assert_untouched(four.layers[0], before)


def test_failed_load_weights_keeps_what_it_loaded_before_the_error(tmp_path):
    # Documented (Keras's loading is not atomic): layers before the first
    # mismatch are loaded. Load into a fresh model, or keep a copy of the
    # weights, where that matters.
    def net(width):
        return keras.Sequential([keras.Input((4,)), BatchNorm(name="bn1"),
                                 keras.layers.Dense(width, name="dense"),
                                 BatchNorm(name="bn2")], name="net")
    saved = net(5)
    saved.get_layer("bn1").moving_mean.assign(np.full(4, 7.0))
    saved.save_weights(tmp_path / "five.weights.h5")
    target = net(6)
    with pytest.raises(ValueError) as info:
        target.load_weights(tmp_path / "five.weights.h5")
    assert str(info.value).startswith("A total of 2 objects could not be loaded.")
    np.testing.assert_array_equal(target.get_layer("bn1").moving_mean.numpy(), np.full(4, 7.0))
    np.testing.assert_array_equal(target.get_layer("bn2").moving_mean.numpy(), np.zeros(6))


def test_truncated_weights_file_is_refused(tmp_path):
    _net(4).save_weights(tmp_path / "net.weights.h5")
    data = (tmp_path / "net.weights.h5").read_bytes()
    (tmp_path / "cut.weights.h5").write_bytes(data[:len(data) // 2])
    model = _net(4)
    before = _moving(model.layers[0])
    with pytest.raises(OSError) as info:
        model.load_weights(tmp_path / "cut.weights.h5")
    assert str(info.value) == (  # h5py's
        f"Unable to synchronously open file (truncated file: eof = {len(data) // 2}, "
        f"sblock->base_addr = 0, stored_eof = {len(data)})")
    _assert_untouched(model.layers[0], before)


# --- .keras files ---------------------------------------------------------
# Each load runs in this process: a crash of the interpreter would end the
# test run, so passing also means none happened.


@pytest.fixture
def keras_file(tmp_path):
    path = tmp_path / "net.keras"
    _net(4).save(path)
    return path


def _rewrite(path, out, **members):
    """A copy of the .keras zip at `out` with some members replaced."""
    with zipfile.ZipFile(path) as z:
        files = {name: z.read(name) for name in z.namelist()}
    files.update(members)
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out


def test_truncated_keras_file_is_refused(keras_file, tmp_path):
    cut = tmp_path / "cut.keras"
    data = keras_file.read_bytes()
    cut.write_bytes(data[:len(data) - 30])  # the zip's central directory is at the end
    with pytest.raises(ValueError) as info:
        keras.saving.load_model(cut)
    # Keras reports any .keras path that is not a zip file as "not found".
    assert str(info.value) == (
        f"File not found: filepath={cut}. Please ensure the file is an accessible "
        "`.keras` zip file.")


def test_corrupted_keras_file_is_refused(keras_file, tmp_path):
    bad = tmp_path / "bad.keras"
    data = bytearray(keras_file.read_bytes())
    with zipfile.ZipFile(keras_file) as z:
        weights = z.getinfo("model.weights.h5")
    middle = weights.header_offset + 100 + weights.compress_size // 2
    data[middle:middle + 16] = b"\xff" * 16
    bad.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile) as info:
        keras.saving.load_model(bad)
    assert str(info.value) == "Bad CRC-32 for file 'model.weights.h5'"


def test_keras_file_with_a_garbage_weights_member_is_refused(keras_file, tmp_path):
    bad = _rewrite(keras_file, tmp_path / "bad.keras", **{"model.weights.h5": b"\0" * 64})
    with pytest.raises(OSError) as info:
        keras.saving.load_model(bad)
    assert str(info.value) == "Unable to synchronously open file (file signature not found)"


def test_keras_file_with_a_garbage_config_is_refused(keras_file, tmp_path):
    bad = _rewrite(keras_file, tmp_path / "bad.keras", **{"config.json": b"{not json"})
    with pytest.raises(json.JSONDecodeError) as info:
        keras.saving.load_model(bad)
    assert str(info.value) == (
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")


def test_keras_file_with_weights_of_the_wrong_shape_is_refused(keras_file, tmp_path):
    _net(5).save(tmp_path / "five.keras")
    with zipfile.ZipFile(tmp_path / "five.keras") as z:
        five = z.read("model.weights.h5")
    bad = _rewrite(keras_file, tmp_path / "bad.keras", **{"model.weights.h5": five})
    with pytest.raises(ValueError) as info:
        keras.saving.load_model(bad)
    assert str(info.value) == (
        "A total of 1 objects could not be loaded. Example error message for "
        "object <BatchNorm name=bn, built=True>:\n\n"
        "The shape of the target variable and the shape of the target value in "
        "`variable.assign(value)` must match. variable.shape=(4,), Received: "
        "value.shape=(5,). Target variable: <Variable path=bn/gamma, "
        "shape=(4,), dtype=float32, value=[1. 1. 1. 1.]>\n\n"
        "List of objects that could not be loaded:\n"
        "[<BatchNorm name=bn, built=True>]"
    )


# --- configs --------------------------------------------------------------


def test_unknown_config_key_is_refused():
    # Keras's Layer takes no unknown keyword arguments; a misspelt or newer
    # argument is an error, never silently dropped.
    config = {**BatchNorm(name="bn").get_config(), "momentun": 0.5}
    with pytest.raises(TypeError) as info:
        BatchNorm.from_config(config)
    shown = {**config, "dtype": "float32"}  # Keras shows the dtype policy by its name
    assert str(info.value) == (
        f"Error when deserializing class 'BatchNorm' using config={shown}.\n\n"
        "Exception encountered: Unrecognized keyword arguments passed to BatchNorm: "
        "{'momentun': 0.5}")


def test_unknown_config_key_in_a_keras_file_is_refused(keras_file, tmp_path):
    with zipfile.ZipFile(keras_file) as z:
        config = json.loads(z.read("config.json"))
    config["config"]["layers"][1]["config"]["momentun"] = 0.5
    bad = _rewrite(keras_file, tmp_path / "bad.keras",
                   **{"config.json": json.dumps(config).encode()})
    with pytest.raises(TypeError) as info:
        keras.saving.load_model(bad)
    # The whole message repeats the model's config, object ids included.
    assert str(info.value).endswith(
        "Exception encountered: Unrecognized keyword arguments passed to BatchNorm: "
        "{'momentun': 0.5}")


def test_config_without_the_newer_keys_gets_their_defaults():
    # Documented: a config written before an argument existed loads with the
    # argument's default.
    config = BatchNorm(name="bn", momentum=0.7).get_config()
    for key in ("fused", "synchronized", "renorm", "renorm_clipping", "renorm_momentum",
                "virtual_batch_size", "unbiased_moving_variance", "guard_bad_batches"):
        del config[key]
    layer = BatchNorm.from_config(config)
    assert layer.momentum == 0.7
    assert layer.get_config() == BatchNorm(name="bn", momentum=0.7).get_config()
