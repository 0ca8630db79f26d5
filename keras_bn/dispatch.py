"""The kernel a call takes, for the Keras backend in use.

`route(x, axis, epsilon, training=..., fused=...)` returns the choice and
its reason, as data; `train` and `infer` run it. On TensorFlow these are
`keras_bn.backend.tensorflow.dispatch`'s (the fused kernel or TF ops, per
call); on PyTorch `keras_bn.backend.torch.dispatch`'s (torch's native
kernel or keras.ops); on JAX `keras_bn.backend.portable`'s (keras.ops).
"""

from keras_bn import backend as _backend

if _backend.NAME == "tensorflow":
    from keras_bn.backend.tensorflow import dispatch as _kernels
elif _backend.NAME == "torch":
    from keras_bn.backend.torch import dispatch as _kernels
else:
    from keras_bn.backend import portable as _kernels

route = _kernels.route
train = _kernels.train
infer = _kernels.infer

__all__ = ["route", "train", "infer"]
