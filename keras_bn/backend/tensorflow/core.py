"""TensorFlow's answers to the few questions the layer and the checks ask
of a backend (`keras_bn.backend`): graph ordering, a symbolic flag,
dynamic shapes, ragged and sparse inputs, checks at run time."""

import tensorflow as tf


def after(y, update):
    """Runs `update()` ordered after y in a graph: nothing it overwrites is
    read late."""
    with tf.control_dependencies([y]):
        update()
    return y


def cond(pred, if_true, if_false):
    return tf.cond(pred, if_true, if_false)


def dynamic_shape(x):
    """tf.shape(x), what tf_keras passes its `adjustment`."""
    return tf.shape(x)


def concrete_bool(value):
    """An eager bool tensor's value; None for a symbolic one, left to
    `tf.cond`."""
    if not tf.executing_eagerly() or not hasattr(value, "numpy"):
        return None
    return bool(value.numpy())


def dense_input(inputs, caller):
    """Refuses ragged and sparse inputs, each with the way out."""
    if isinstance(inputs, tf.RaggedTensor):
        raise TypeError(
            f"{caller}: expected a dense tensor; received a RaggedTensor. Pad "
            "it with `x.to_tensor()` and pass `mask=` to keep the padding out "
            "of the batch statistics.")
    if isinstance(inputs, tf.SparseTensor):
        raise TypeError(
            f"{caller}: expected a dense tensor; received a SparseTensor. "
            "Convert it with `tf.sparse.to_dense(x)` first.")
    return inputs


def runtime_equal(x, actual, expected, message):
    """`x`, once `actual == expected` has been checked when the graph runs
    (sizes known only then: a traced [None, None] signature)."""
    with tf.control_dependencies([tf.debugging.assert_equal(actual, expected, message=message)]):
        return tf.identity(x)
