"""The one place that picks a kernel for a call on PyTorch, and runs it.

torch's native kernel (`native_kernel`) serves plain batch norm over one
channel axis: 2.5 to 3.5 times faster than the same math in keras.ops on a
CPU (benchmarks/README.md, "PyTorch"), since eager torch runs each op as
its own pass. The keras.ops kernel (`backend.portable`) serves what the
native one can't compute: masks, ghost batches, renorm, several channel
axes, an empty batch. `route` says which, and why.
"""

from keras_bn import ops
from keras_bn.backend import portable
from keras_bn.backend.torch import distributed
from keras_bn.backend.torch import native_kernel

NATIVE = "torch_native"
KERAS_OPS = portable.KERAS_OPS
Route = portable.Route


def route(x, axis, epsilon, *, training, fused=None, features=None, caller="batch_norm"):
    """The kernel a call takes, and why (features as in the TensorFlow
    backend's `dispatch.route`: the options in use)."""
    features = features or {}
    if features.get("synchronized"):
        return Route(KERAS_OPS, "synchronized across the torch.distributed process group: "
                                "the keras.ops kernel with all-summed statistics")
    needs = sorted(name for name in features if name != "adjustment")
    if needs:
        return Route(KERAS_OPS, f"{', '.join(needs)}: the keras.ops kernel computes it, "
                                "torch's native kernel doesn't")
    if not isinstance(axis, int):
        return Route(KERAS_OPS, "several channel axes: the keras.ops kernel")
    if x.shape[0] == 0:
        return Route(KERAS_OPS, "an empty batch: the keras.ops kernel (the native one refuses it)")
    if len(x.shape) < 2:
        return Route(KERAS_OPS, "a rank-1 input: the keras.ops kernel")
    return Route(NATIVE, "torch's native batch norm, its own backward to every order")


def train(x, *, gamma, beta, epsilon, axis, fused=None, synchronized=False,
          virtual_batch_size=None, mask=None, correction=None, adjustment=None,
          caller="batch_norm"):
    """As the TensorFlow backend's `dispatch.train`."""
    synchronize = bool(synchronized) and distributed.active()
    features = {name: value for name, value in (
        ("synchronized", synchronize), ("virtual_batch_size", virtual_batch_size),
        ("mask", mask), ("renorm", correction is not None),
        ("adjustment", adjustment is not None))
        if value is not None and value is not False}
    if adjustment is not None:
        # Folded into gamma and beta once, for either kernel.
        gamma, beta = ops.adjusted_gamma_and_beta(
            gamma=gamma, beta=beta, adjust_scale=adjustment[0], adjust_bias=adjustment[1])
    if route(x, axis, epsilon, training=True, features=features).kernel == KERAS_OPS:
        y, stats = portable.train(
            x, gamma=gamma, beta=beta, epsilon=epsilon, axis=axis, fused=fused,
            synchronized=synchronize, virtual_batch_size=virtual_batch_size, mask=mask,
            correction=correction, caller=caller,
            all_sum=distributed.all_sum if synchronize else None)
    else:
        y, stats = native_kernel.train(x, gamma=gamma, beta=beta, epsilon=epsilon, axis=axis)
    if not synchronize and distributed.active():
        # Each process normalized with its own statistics; the moving ones
        # follow their average, the same in every process.
        stats = distributed.averaged(stats)
    return y, stats


def infer(x, *, mean, variance, gamma, beta, epsilon, axis, fused=None, caller="batch_norm"):
    """Inference-mode normalization with the given (C,) statistics."""
    if route(x, axis, epsilon, training=False).kernel == KERAS_OPS:
        return portable.infer(x, mean=mean, variance=variance, gamma=gamma, beta=beta,
                              epsilon=epsilon, axis=axis, caller=caller)
    return native_kernel.infer(x, mean=mean, variance=variance, gamma=gamma, beta=beta,
                               epsilon=epsilon, axis=axis)
