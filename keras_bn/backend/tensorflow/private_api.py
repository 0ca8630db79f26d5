"""Each use of a private TensorFlow API, one helper apiece.

No public API answers these questions; keeping every such use here means a
TensorFlow upgrade that moves one breaks one function, not the package,
and each says what happens then.
"""

import functools

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
