"""keras_bn: batch normalization for Keras 3, on TensorFlow (the default),
JAX and PyTorch.

`BatchNorm` is the layer, `batch_norm` the same math as a pure function.
"""

import os as _os

# The Keras backends keras_bn runs on. TensorFlow has its own kernels (the
# fused one, TF ops, tf.distribute); JAX and PyTorch take the keras.ops one.
_BACKENDS = ("tensorflow", "jax", "torch")

_NO_TENSORFLOW = (
    "keras_bn on Keras's TensorFlow backend needs TensorFlow, which is not "
    "installed: `pip install tensorflow` (or, on Linux, `tensorflow-cpu`, the "
    "smaller CPU-only wheel, or 'tensorflow[and-cuda]' for NVIDIA GPUs). In a "
    "clone of keras_bn, `pip install -e '.[cpu]'` installs it with the "
    "package. For JAX or PyTorch, set KERAS_BACKEND=jax or torch.")


def _chosen(backend, failure=None):
    """What chose the backend: KERAS_BACKEND where set, else keras.json
    (Keras's order). `backend` is None where Keras failed to start it
    (`failure`)."""
    chosen = _os.environ.get("KERAS_BACKEND")
    if chosen:
        return f"KERAS_BACKEND={chosen!r}"
    named = "another backend" if backend is None else f'"backend": "{backend}"'
    failed = "" if failure is None else f", which Keras failed to start ({failure})"
    return f"{named} in keras.json (under KERAS_HOME, ~/.keras by default){failed}"


def _unsupported(backend, failure=None):
    """The error for a Keras backend keras_bn doesn't run on."""
    where = ("Set KERAS_BACKEND to tensorflow, jax or torch."
             if _os.environ.get("KERAS_BACKEND")
             else 'Set "backend": "tensorflow", "jax" or "torch" there, or KERAS_BACKEND.')
    return ImportError(
        "keras_bn runs on the TensorFlow, JAX and PyTorch backends of Keras; "
        f"received {_chosen(backend, failure)}. {where}")


# Keras picks its backend once, at its first import; keras_bn asks Keras
# which one it started, never a setting Keras may have overridden.
try:
    import keras as _keras
except ModuleNotFoundError as _error:
    if _error.name == "tensorflow":
        raise ImportError(_NO_TENSORFLOW) from _error
    # Keras imports its backend's packages first: without one of these,
    # another backend was asked for and failed before Keras could say which.
    if _error.name not in ("jax", "torch", "openvino"):
        raise
    if _error.name in ("jax", "torch"):
        # Keras's jax or torch backend (or its numpy one, which keras_bn
        # doesn't run on, and which needs jax) without its package.
        _name = {"jax": "JAX", "torch": "PyTorch"}[_error.name]
        raise ImportError(
            f"keras_bn: Keras could not start its backend; received "
            f"{_chosen(None, _error)}. For keras_bn on {_name}, `pip install "
            f"{_error.name}` (in a clone of keras_bn, `pip install -e "
            f"'.[{_error.name}]'`).") from _error
    raise _unsupported(None, _error) from _error
if _keras.config.backend() not in _BACKENDS:
    raise _unsupported(_keras.config.backend())
if _keras.config.backend() == "tensorflow":
    try:
        import tensorflow as _tf  # noqa: F401
    except ImportError as _error:  # pragma: no cover - depends on the install
        raise ImportError(_NO_TENSORFLOW) from _error

from keras_bn.calibration import RecalibrationReport
from keras_bn.calibration import recalibrate
from keras_bn.convert import from_keras
from keras_bn.convert import to_keras
from keras_bn.folding import ChannelAffine
from keras_bn.folding import fold_batch_norms
from keras_bn.interop import from_torch
from keras_bn.interop import to_torch_state_dict
from keras_bn.layer import BatchNorm
from keras_bn.functional import batch_norm

__version__ = "0.2.0"

__all__ = [
    "BatchNorm",
    "ChannelAffine",
    "RecalibrationReport",
    "batch_norm",
    "fold_batch_norms",
    "from_keras",
    "from_torch",
    "recalibrate",
    "to_keras",
    "to_torch_state_dict",
]
