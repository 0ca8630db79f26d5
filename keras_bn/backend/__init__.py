"""What differs per Keras backend, behind one set of names: the few
questions the layer and the checks ask of a backend (graph ordering, a
symbolic flag, dynamic shapes, ragged and sparse inputs, checks at run
time, the counters' dtype). The kernels are reached through
`keras_bn.dispatch`, which imports this backend's. Keras picks its backend
once, at its first import, and so does this module.
"""

import keras

NAME = keras.config.backend()

if NAME == "tensorflow":
    from keras_bn.backend.tensorflow import core as _core
else:
    from keras_bn.backend import portable as _core

after = _core.after
cond = _core.cond
dynamic_shape = _core.dynamic_shape
concrete_bool = _core.concrete_bool
dense_input = _core.dense_input
runtime_equal = _core.runtime_equal

__all__ = ["NAME", "after", "cond", "dynamic_shape", "concrete_bool", "dense_input",
           "runtime_equal", "counter_dtype"]


def counter_dtype():
    """The integer dtype of the counters (num_batches_tracked, renorm_steps,
    refused_batches): int64, or int32 on JAX without 64-bit types enabled
    (jax_enable_x64), which would otherwise truncate and warn on every
    read."""
    if NAME == "jax":
        import jax

        return "int64" if jax.config.jax_enable_x64 else "int32"
    return "int64"
