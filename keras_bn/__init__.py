"""keras_bn: batch normalization for Keras 3 on TensorFlow.

`BatchNorm` is the layer, `batch_norm` the same math as a pure function.
"""

import os as _os

# Keras picks its backend once, at first import; this package is built on
# TensorFlow's ops, so a different backend is an error, not a silent mix.
if _os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    raise ImportError(
        "keras_bn needs the TensorFlow backend of Keras; received "
        f"KERAS_BACKEND={_os.environ['KERAS_BACKEND']!r}. Unset it or set "
        "KERAS_BACKEND=tensorflow."
    )

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
