"""`dispatch.route`: the one choice of kernel per call, with its reason as
data. (The graphs each choice builds are checked in test_fused_kernel.py.)"""

import pytest
import tensorflow as tf

from keras_bn.backend.tensorflow import dispatch

cpu_only = pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                              reason="the CPU's choices")


EAGER = "eagerly, one kernel instead of many ops"


def _route(shape, axis=-1, dtype=tf.float32, **kwargs):
    x = tf.zeros(shape, dtype)
    return dispatch.route(x, axis % len(shape), 1e-5, **kwargs)


@cpu_only
@pytest.mark.parametrize("shape, axis, training, fused, features, route", [
    ((8, 4, 4, 3), -1, True, None, {}, ("fused", f"faster here: {EAGER}")),
    ((8, 3, 4, 4), 1, True, None, {}, ("tf_ops", "faster here: channels-first on CPU")),
    ((8, 3, 4, 4), 1, True, True, {}, ("fused", "fused=True")),
    ((8, 4, 4, 3), -1, True, False, {}, ("tf_ops", "fused=False")),
    ((8, 6), -1, False, None, {}, ("fused", f"faster here: {EAGER}")),
    ((8, 4, 4, 3), -1, False, None, {}, ("fused", f"faster here: {EAGER}")),
    ((8, 3, 4, 4), 1, False, None, {}, ("tf_ops", "faster here: channels-first on CPU")),
    ((8, 6), -1, False, False, {}, ("tf_ops", "fused=False")),
    ((8, 6), -1, True, None, {"mask": True}, ("tf_ops", "mask needs TF ops")),
    ((8, 6), -1, False, None, {"renorm": True}, ("fused", f"faster here: {EAGER}")),
])
def test_route_and_reason_on_cpu(shape, axis, training, fused, features, route):
    assert tuple(_route(shape, axis, training=training, fused=fused, features=features)) == route


def test_float64_goes_to_tf_ops_and_says_why():
    assert tuple(_route((4, 3), dtype=tf.float64, training=True)) == (
        "tf_ops", "the kernel takes float16, bfloat16 or float32 inputs; received dtype float64")


def test_under_xla_tf_ops_are_faster():
    @tf.function(jit_compile=True)
    def f(x):
        reasons.append(dispatch.route(x, 3, 1e-5, training=True))
        return x

    reasons = []
    f(tf.zeros((2, 2, 2, 3)))
    assert tuple(reasons[0]) == ("tf_ops", "faster here: under XLA, which fuses TF ops")


FOLDS = "; x * a + b, which converters fold"


@cpu_only
@pytest.mark.parametrize("shape, axis, fused, route", [
    ((8, 6), -1, None, ("foldable", f"inference of a rank-2 input{FOLDS}")),
    ((8, 4, 6), -1, None, ("foldable", f"inference of a rank-3 input{FOLDS}")),
    ((8, 3, 4, 4), 1, None, ("foldable", f"faster here: channels-first on CPU{FOLDS}")),
    ((8, 4, 4, 3), -1, False, ("foldable", f"fused=False{FOLDS}")),
])
def test_traced_inference_by_ops_keeps_the_form_converters_fold(shape, axis, fused, route):
    # A traced function outside XLA may be a SavedModel's serving function.
    routes = []

    @tf.function
    def f(x):
        routes.append(dispatch.route(x, axis % len(shape), 1e-5, training=False, fused=fused))
        return x

    f(tf.zeros(shape))
    assert tuple(routes[0]) == route


@pytest.mark.parametrize("shape, axis", [((8, 6), -1), ((8, 3, 4, 4), 1), ((2, 3, 4, 4, 5), -1)])
def test_inference_under_xla_is_centred_first(shape, axis):
    # Nothing converts an XLA cluster: the exact form, fused by XLA anyway.
    routes = []

    @tf.function(jit_compile=True)
    def f(x):
        routes.append(dispatch.route(x, axis % len(shape), 1e-5, training=False))
        return x

    f(tf.zeros(shape))
    assert tuple(routes[0]) == ("tf_ops", "faster here: under XLA, which fuses TF ops")


def test_fused_true_that_cannot_be_served_names_the_caller():
    with pytest.raises(ValueError) as info:
        _route((4, 3), training=True, fused=True, features={"renorm": True},
               caller="BatchNorm 'bn'")
    assert str(info.value) == (
        "BatchNorm 'bn': argument `renorm` needs the TF-ops path, but fused=True requires "
        "TensorFlow's fused kernel; received renorm=True with fused=True. Pass fused=None "
        "(the default) or False.")


def _traced_route(shape, dtype=tf.float32, training=True):
    """The route of a channels-last call traced in a tf.function."""
    routes = []

    @tf.function
    def f(x):
        routes.append(dispatch.route(x, len(shape) - 1, 1e-5, training=training))
        return x

    f(tf.zeros(shape, dtype))
    return tuple(routes[0])


@cpu_only
@pytest.mark.parametrize("kind", ["onednn", "eigen"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_traced_channels_last_route_follows_the_table_for_each_cpu_kind(
        monkeypatch, kind, dtype, training):
    # Each (kind, training, half) entry of FUSED_FROM decides: the kernel
    # from that many values on, TF ops below it.
    monkeypatch.setattr(dispatch, "cpu_kind", lambda: kind)
    least = dispatch.FUSED_FROM[(kind, training, dtype == tf.bfloat16)]
    mode = "training" if training else "inference"
    where = (f"{mode} of {'half-precision' if dtype == tf.bfloat16 else 'float32'} "
             f"values with {'oneDNN' if kind == 'onednn' else 'Eigen (oneDNN off)'}")
    for shape, values in (((4, 4, 4, 8), 512), ((16, 16, 16, 32), 2**17)):
        if values >= least:
            want = ("fused", f"faster here: {where}: {values} values, the kernel from {least}")
        else:
            want = ("tf_ops", f"faster here: {where}: {values} values, TF ops below {least}")
        assert _traced_route(shape, dtype, training) == want


@cpu_only
def test_traced_training_of_a_tiny_tensor_takes_tf_ops_and_a_large_one_the_kernel(monkeypatch):
    # The table's point, whatever its exact limits: the kernel's fixed cost
    # per call is not repaid by 512 values, and is by 2^20, on either kind.
    monkeypatch.setattr(dispatch, "cpu_kind", lambda: "onednn")
    assert _traced_route((4, 4, 4, 8))[0] == "tf_ops"
    assert _traced_route((16, 32, 32, 64))[0] == "fused"
    monkeypatch.setattr(dispatch, "cpu_kind", lambda: "eigen")
    assert _traced_route((16, 32, 32, 64))[0] == "fused"


@cpu_only
def test_dense_float32_training_on_eigen_takes_tf_ops_at_any_size(monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_kind", lambda: "eigen")
    assert _traced_route((4096, 256)) == (
        "tf_ops", "faster here: training of float32 values with Eigen (oneDNN off): "
        "TF ops at any size for a dense input")
    assert _traced_route((4096, 256), tf.bfloat16)[0] == "fused"
    assert _traced_route((4096, 256), training=False)[0] == "foldable"  # rank-2 inference
    monkeypatch.setattr(dispatch, "cpu_kind", lambda: "onednn")
    assert _traced_route((4096, 256))[0] == "fused"


@cpu_only
def test_an_unknown_batch_counts_as_keras_default_batch_size(monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_kind", lambda: "onednn")
    routes = []

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 32])])
    def f(x):
        routes.append(dispatch.route(x, 3, 1e-5, training=True))
        return x

    f.get_concrete_function()
    # [None, 8, 8, 32] counts as 32 * 8 * 8 * 32 = 65536 values.
    assert routes[0].reason.startswith(
        "faster here: training of float32 values with oneDNN: 65536 values, ")


@pytest.mark.parametrize("setting, kind", [("0", "eigen"), ("1", "onednn")])
def test_cpu_kind_follows_tensorflow_onednn_setting(setting, kind):
    # TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import: a fresh
    # process per setting.
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", "from keras_bn.backend.tensorflow import dispatch; print(dispatch.cpu_kind())"],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == kind
