"""`one_side.one_side`: one of two computations per call, in each context."""

import numpy as np
import pytest
import tensorflow as tf

from keras_bn.backend.tensorflow import one_side


def _failing(x, zero):
    # Raises if it runs: x is positive. Depends on the switched x, as any
    # side's work does.
    with tf.control_dependencies([tf.debugging.assert_negative(x)]):
        return tf.identity(x), tf.identity(zero)


def _doubling(x, zero):
    return 2.0 * x, zero + 1.0


def _passing(x, zero):
    return x, zero


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("pred", [True, False])
def test_runs_the_side_the_predicate_names(mode, pred):
    x = tf.constant([1.0, 2.0])

    def call(p, x):
        return one_side.one_side(p, _doubling, _passing, x, tf.zeros_like(x))

    if mode != "eager":
        call = tf.function(call, jit_compile=mode == "xla")
    y, z = call(tf.constant(pred), x)
    np.testing.assert_array_equal(y.numpy(), [2.0, 4.0] if pred else [1.0, 2.0])
    np.testing.assert_array_equal(z.numpy(), [1.0, 1.0] if pred else [0.0, 0.0])


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("pred", [True, False])
def test_the_other_side_does_not_run(mode, pred):
    if_true, if_false = (_doubling, _failing) if pred else (_failing, _passing)

    def call(p, x):
        return one_side.one_side(p, if_true, if_false, x, tf.zeros_like(x))

    if mode == "graph":
        call = tf.function(call)
    call(tf.constant(pred), tf.constant([1.0, 2.0]))  # no InvalidArgumentError


def test_a_constant_passed_in_is_not_taken_from_the_untaken_side():
    # A zeros_like made on a side is folded into a constant that is always
    # ready, and Merge would forward it whichever side runs: passed in, it
    # goes through the Switch like any input.
    @tf.function
    def call(p, x):
        return one_side.one_side(p, lambda x, zero: (x + 1.0,), lambda x, zero: (zero,),
                                 x, tf.zeros_like(x))

    np.testing.assert_array_equal(call(tf.constant(True), tf.ones(2))[0].numpy(), [2.0, 2.0])
    np.testing.assert_array_equal(call(tf.constant(False), tf.ones(2))[0].numpy(), [0.0, 0.0])
