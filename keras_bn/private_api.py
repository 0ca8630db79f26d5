"""Each use of a private Keras or TensorFlow API, one helper apiece.

No public API answers these questions; keeping every such use here means a
Keras or TensorFlow upgrade that moves one breaks one function, not the
package, and each says what happens then.
"""

import functools

import keras
import tensorflow as tf


def in_xla_context():
    """True while tracing a function compiled with XLA (jit_compile=True).

    Reads TensorFlow's graph context; should that move, it answers False,
    which only costs speed (dispatch then picks the non-XLA kernels).
    """
    try:
        from tensorflow.python.ops import control_flow_util

        graph = tf.compat.v1.get_default_graph()
        return bool(control_flow_util.GraphOrParentsInXlaContext(graph))
    except Exception:  # pragma: no cover - depends on TF internals
        return False


def has_layer_graph(model):
    """Whether a keras.Model is functional (its layer graph known), not
    subclassed.

    Keras keeps that graph in `_nodes_by_depth`; should it move, the answer
    is False, and conversion and folding refuse a functional model as they
    refuse a subclassed one.
    """
    return hasattr(model, "_nodes_by_depth")


def call_nodes(model):
    """The call nodes of a built Sequential or functional model's graph.

    Keras keeps the graph in these attributes and has no public accessor
    (a built Sequential model wraps a functional one). Folding and
    conversion walk it to see which layer feeds which.
    """
    graph = model._functional if isinstance(model, keras.Sequential) else model
    return [node for nodes in graph._nodes_by_depth.values() for node in nodes
            if not node.is_input]


def all_layers(model):
    """`model` and every layer nested in it, at any depth.

    `model.layers` stops at the first level; `_flatten_layers` is the walk
    Keras itself uses (for weights, metrics, `trainable`).
    """
    return list(model._flatten_layers(include_self=True, recursive=True))


@functools.cache
def onednn_enabled():
    """Whether TensorFlow runs its CPU ops through oneDNN in this process.

    TensorFlow decides once, at import, from TF_ENABLE_ONEDNN_OPTS or, unset, from
    the CPU (on by default only with AVX-512 VNNI/BF16 or AMX); only its
    private util port says what it decided. Should that move, the answer is
    False: the Eigen CPU's kernel choices, which cost only speed.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # pragma: no cover - depends on TF internals
        return False
