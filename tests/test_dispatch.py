"""`dispatch.route`: the one choice of kernel per call, with its reason as
data. (The graphs each choice builds are checked in test_fused_kernel.py.)"""

import pytest
import tensorflow as tf

from keras_bn import dispatch

cpu_only = pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                              reason="the CPU's choices")


def _route(shape, axis=-1, dtype=tf.float32, **kwargs):
    x = tf.zeros(shape, dtype)
    return dispatch.route(x, axis % len(shape), 1e-5, **kwargs)


@cpu_only
@pytest.mark.parametrize("shape, axis, training, fused, features, route", [
    ((8, 4, 4, 3), -1, True, None, (), ("fused", "faster here")),
    ((8, 3, 4, 4), 1, True, None, (), ("tf_ops", "faster here")),
    ((8, 3, 4, 4), 1, True, True, (), ("fused", "fused=True")),
    ((8, 4, 4, 3), -1, True, False, (), ("tf_ops", "fused=False")),
    ((8, 6), -1, False, None, (), ("tf_ops", "inference of a rank-2 input")),
    ((8, 4, 4, 3), -1, False, None, (), ("fused", "faster here")),
    ((8, 6), -1, True, None, ("mask",), ("tf_ops", "mask needs TF ops")),
    ((8, 6), -1, False, None, ("renorm",), ("tf_ops", "inference of a rank-2 input")),
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
    assert tuple(reasons[0]) == ("tf_ops", "faster here")


def test_fused_true_that_cannot_be_served_names_the_caller():
    with pytest.raises(ValueError) as info:
        _route((4, 3), training=True, fused=True, features=("renorm",), caller="BatchNorm 'bn'")
    assert str(info.value) == (
        "BatchNorm 'bn': fused=True, but the kernel computes plain per-replica statistics "
        "only; received renorm.")
