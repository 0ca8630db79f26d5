import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.config.backend()

# The modules that run under every Keras backend; the others test
# TensorFlow's kernels, tf.function, tf.distribute, SavedModels and TFLite,
# and import TensorFlow, which the other backends' environments lack.
EVERY_BACKEND = {"test_portable.py", "test_import.py", "test_torch_native.py"}


class _TensorFlowOnly(pytest.Module):
    """A TensorFlow module under another backend: reported as skipped, with
    the reason, without importing it (it imports TensorFlow)."""

    def _getobj(self):
        pytest.skip(f"TensorFlow-only (its kernels, tf.function, tf.distribute, "
                    f"SavedModels, TFLite); the Keras backend is {BACKEND}",
                    allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    name = pathlib.Path(module_path).name
    if BACKEND != "tensorflow" and name.startswith("test_") and name not in EVERY_BACKEND:
        return _TensorFlowOnly.from_parent(parent, path=module_path)
    return None


def pytest_report_header(config):
    return [f"Keras backend {BACKEND}"]


if BACKEND == "tensorflow":
    import tensorflow as tf

    # Two logical CPU devices for the in-process MirroredStrategy tests; this
    # must happen before TensorFlow initializes its devices, i.e. here.
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True)
def _float32_policy_and_seed():
    """Each test starts from the float32 policy and a fixed seed."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(params=["kernel", "tf_ops"])
def both_paths(request, monkeypatch):
    """Runs a test once on each path: TensorFlow's fused kernel wherever it
    can serve (whatever the speed heuristic would pick), and plain TF ops."""
    from keras_bn.backend.tensorflow import dispatch

    monkeypatch.setattr(dispatch, "fused_is_faster",
                        lambda *args: (request.param == "kernel", "both_paths"))
    return request.param


@pytest.fixture(scope="session")
def strategy():
    """One MirroredStrategy over the two logical CPUs for the whole run: a
    second one would reuse the first one's collective instance keys, and
    TensorFlow refuses a key seen before with another dtype."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def channels_first_conv2d_runs():
    """Whether TensorFlow runs a channels-first Conv2D here, found by trying.

    TensorFlow's own (Eigen) CPU Conv2D takes NHWC only; oneDNN's and
    cuDNN's take NCHW too. Whether oneDNN is on depends on the CPU and on
    TF_ENABLE_ONEDNN_OPTS, so a tiny conv answers, once per run.
    """
    try:
        keras.ops.conv(tf.zeros((1, 1, 1, 1)), tf.zeros((1, 1, 1, 1)),
                       data_format="channels_first")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


@pytest.fixture
def needs_channels_first_conv2d(channels_first_conv2d_runs):
    """Skips a test that needs TensorFlow's channels-first Conv2D kernel."""
    if not channels_first_conv2d_runs:
        pytest.skip("channels-first Conv2D needs oneDNN or a GPU on this CPU")
