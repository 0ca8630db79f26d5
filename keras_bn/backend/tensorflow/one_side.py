"""Running one of two computations per call, as cheaply as the context
allows: what the kernels use for work that only a rare batch needs (data
far from zero).
"""

import tensorflow as tf

from keras_bn.backend.tensorflow import private_api


def in_plain_graph():
    """Tracing a graph outside XLA: where `one_side` is Switch and Merge,
    and what a SavedModel's serving function (so a converter) sees."""
    return not tf.executing_eagerly() and not private_api.in_xla_context()


def one_side(pred, if_true, if_false, *inputs):
    """`if_true(*inputs)` where the scalar bool `pred` holds, else
    `if_false(*inputs)`; either returns a tuple of tensors.

    Eagerly Python chooses; under XLA, `tf.cond` (the untaken branch
    costs compile time only). In a graph, TensorFlow's plain Switch and
    Merge: `tf.cond` would cost about 50 ms of tracing and optimization per
    batch norm at start-up (benchmarks/README.md), and the untaken side of
    a Switch isn't run. Every output of either side must be one of its
    inputs or computed from them (Switch hands them only to the taken
    side), so that the untaken side's outputs are never ready; a constant
    made on a side (`tf.zeros_like` of a known shape is folded into one)
    would always be, so pass it in as an input. Used inside custom gradients
    only: no gradient is ever taken through Switch and Merge (which
    GradientTape can't).
    """
    if tf.executing_eagerly():
        return if_true(*inputs) if bool(pred) else if_false(*inputs)
    if private_api.in_xla_context():
        return tf.cond(pred, lambda: if_true(*inputs), lambda: if_false(*inputs))
    switched = [tf.raw_ops.Switch(data=t, pred=pred) for t in inputs]
    false_out = if_false(*(s.output_false for s in switched))
    true_out = if_true(*(s.output_true for s in switched))
    return tuple(tf.raw_ops.Merge(inputs=[f, t]).output for f, t in zip(false_out, true_out))
