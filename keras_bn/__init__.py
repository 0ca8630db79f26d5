"""keras_bn: batch normalization for Keras 3 on TensorFlow.

`BatchNorm` is the layer, `batch_norm` the same math as a pure function.
"""

import os as _os

try:
    import tensorflow as _tf  # noqa: F401
except ImportError as _error:  # pragma: no cover - depends on the install
    raise ImportError(
        "keras_bn needs TensorFlow, which is not installed: "
        "`pip install tensorflow` (or, on Linux, `tensorflow-cpu`, the "
        "smaller CPU-only wheel, or 'tensorflow[and-cuda]' for NVIDIA "
        "GPUs). In a clone of keras_bn, `pip install -e '.[cpu]'` installs "
        "it with the package."
    ) from _error


def _not_tensorflow(backend, failure=None):
    """The error for a Keras backend other than TensorFlow's, naming what
    chose it: KERAS_BACKEND where set, else keras.json (Keras's order).
    `backend` is None where Keras failed to start it (`failure`)."""
    chosen = _os.environ.get("KERAS_BACKEND")
    if chosen:
        received = (f"KERAS_BACKEND={chosen!r}. Unset it or set "
                    "KERAS_BACKEND=tensorflow.")
    else:
        named = ("another backend" if backend is None
                 else f'"backend": "{backend}"')
        failed = "" if failure is None else f", which Keras failed to start ({failure})"
        received = (f"{named} in keras.json (under KERAS_HOME, ~/.keras by "
                    f'default){failed}. Set "backend": "tensorflow" there, or '
                    "KERAS_BACKEND=tensorflow.")
    return ImportError(
        f"keras_bn needs the TensorFlow backend of Keras; received {received}")


# Keras picks its backend once, at its first import; this package is built
# on TensorFlow's ops, so another backend is an error, not a silent mix.
try:
    import keras as _keras
except ModuleNotFoundError as _error:
    # Keras imports its backend's packages first. The TensorFlow backend
    # needs none of these, so without one of them another backend was asked
    # for, and failed before Keras could say which.
    if _error.name not in ("jax", "torch", "openvino"):
        raise
    raise _not_tensorflow(None, _error) from _error
if _keras.config.backend() != "tensorflow":
    raise _not_tensorflow(_keras.config.backend())

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
