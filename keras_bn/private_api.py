"""Each use of a private Keras API, one helper apiece.

No public API answers these questions; keeping every such use here means a
Keras upgrade that moves one breaks one function, not the
package, and each says what happens then.
"""

import keras


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


def track_state(layer, variable):
    """Makes `variable` part of `layer.variables` (so of the state Keras's
    JAX trainer and `stateless_call` pass through a step) without making it
    a weight (`get_weights`, saving).

    Keras has that category only for random-seed state: `variables` lists
    the `state` of each entry of `_seed_generators`, and nothing else reads
    that list. Should it move, the variable is still updated where state is
    not threaded (eager, TensorFlow, PyTorch), and under JAX's jit it keeps
    its value.
    """
    holder = type("TrackedState", (), {"state": variable})()
    seeds = getattr(layer, "_seed_generators", None)
    if isinstance(seeds, list):
        seeds.append(holder)
