"""`conv_fold`: inference right after a convolution joins it, in a graph.

Each case runs the same model through TF ops (fused=False, nothing joined)
as the reference: outputs and every gradient, of first and second order;
and reads the graph TensorFlow really ran (after Grappler and oneDNN's
rewrite) to see that the batch norm has become part of the convolution.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNorm

cpu_only = pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                              reason="Grappler's CPU fusions")


def _runtime_op_types(fn, *args):
    """Op types (with their fused_ops) of the graphs TensorFlow really ran
    for `fn(*args)`: after Grappler and, where on, the oneDNN rewrite."""
    from tensorflow.python.eager import context

    # The optimized graphs are recorded when a function is first run.
    context.enable_run_metadata()
    try:
        context.export_run_metadata()  # drops what earlier runs left there
        tf.function(fn)(*args)
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    types = []
    for function_graphs in metadata.function_graphs:
        for graph in function_graphs.partition_graphs:
            for node in graph.node:
                fused_ops = [s.decode() for s in node.attr["fused_ops"].list.s]
                types.append(node.op + (f"[{','.join(fused_ops)}]" if fused_ops else ""))
    return types


def _conv_bn_relu(filters=6, **bn_args):
    """Conv2D with a bias -> BatchNorm -> ReLU, built, with non-trivial
    weights and moving statistics."""
    rng = np.random.RandomState(7)
    conv = keras.layers.Conv2D(filters, 3, use_bias=True)
    bn = BatchNorm(**bn_args)
    model = keras.Sequential([keras.Input((7, 7, 3)), conv, bn, keras.layers.ReLU()])
    conv.bias.assign(rng.normal(3.0, 2.0, filters).astype(np.float32))
    bn.gamma.assign(rng.uniform(0.5, 2.0, filters).astype(np.float32))
    bn.beta.assign(rng.normal(0.0, 1.0, filters).astype(np.float32))
    bn.moving_mean.assign(rng.normal(3.0, 2.0, filters).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.5, 4.0, filters).astype(np.float32))
    return model, conv, bn


@cpu_only
def test_inference_after_a_biased_conv2d_fuses_into_the_convolution():
    # Conv2D -> BiasAdd -> FusedBatchNorm -> Relu: Grappler's CPU fusion
    # pattern is Conv2D -> FusedBatchNorm (-> Relu), which the bias would
    # break; with the bias taken into the statistics the convolution, its
    # bias, the batch norm and the ReLU run as one op, on either CPU kind.
    model, _, _ = _conv_bn_relu()
    x = tf.constant(np.random.RandomState(0).normal(size=(2, 7, 7, 3)), tf.float32)
    types = _runtime_op_types(lambda x: model(x, training=False), x)
    fused_convs = [t for t in types if "FusedConv2D" in t]
    assert len(fused_convs) == 1 and fused_convs[0].endswith("[FusedBatchNorm,Relu]"), types
    assert not {"BiasAdd", "FusedBatchNormV3", "Relu", "Conv2D"} & set(types), types


@pytest.mark.parametrize("graph", [False, True])
def test_absorbed_bias_gives_the_same_outputs_and_every_gradient(graph):
    # The same model through TF ops (fused=False, nothing absorbed) is the
    # reference: outputs, and the gradients of the conv's kernel and bias,
    # gamma, beta and the input, in inference mode (a frozen batch norm
    # during fine-tuning). Float32 sums of 27 products: 1e-5 relative.
    model, conv, bn = _conv_bn_relu()
    reference, _, _ = _conv_bn_relu(fused=False)
    reference.set_weights(model.get_weights())
    x = tf.constant(np.random.RandomState(1).normal(size=(4, 7, 7, 3)), tf.float32)
    dy = tf.constant(np.random.RandomState(2).normal(size=(4, 5, 5, 6)), tf.float32)

    def step(model, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
        conv, bn = model.layers[0], model.layers[1]
        return [y] + tape.gradient(
            y, [x, conv.kernel, conv.bias, bn.gamma, bn.beta], output_gradients=dy)

    run = tf.function(step) if graph else step
    got, want = run(model, x), run(reference, x)
    for name, g, w in zip(["y", "x", "kernel", "bias", "gamma", "beta"], got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


@tf.function
def _d_of_gamma_gradient(model, x, names):
    """Derivatives of d loss / d gamma (nested tapes, in a graph) with
    respect to the named weights of the model's convolution and batch
    norm (its first two layers), for loss = sum(sin(bn(conv(x))))."""
    conv, bn = model.layers[0], model.layers[1]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_sum(tf.sin(bn(conv(x), training=False)))
        g_gamma = inner.gradient(loss, bn.gamma)
    weights = {"kernel": conv.kernel, "bias": conv.bias, "beta": bn.beta}
    return outer.gradient(g_gamma, [weights[name] for name in names])


def test_absorbed_bias_second_derivatives_are_exact():
    # d/d bias of (d loss / d gamma): the cross term the offset's carrier
    # must keep. Reference: the same model through TF ops.
    model, _, _ = _conv_bn_relu()
    reference, _, _ = _conv_bn_relu(fused=False)
    reference.set_weights(model.get_weights())
    x = tf.constant(np.random.RandomState(3).normal(size=(3, 7, 7, 3)), tf.float32)

    for g, w in zip(_d_of_gamma_gradient(model, x, ["bias", "kernel"]),
                    _d_of_gamma_gradient(reference, x, ["bias", "kernel"])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _depthwise_bn_relu6(multiplier=1, use_bias=False, **bn_args):
    rng = np.random.RandomState(8)
    conv = keras.layers.DepthwiseConv2D(3, depth_multiplier=multiplier, use_bias=use_bias)
    bn = BatchNorm(**bn_args)
    model = keras.Sequential([keras.Input((7, 7, 4)), conv, bn, keras.layers.ReLU(6.0)])
    channels = 4 * multiplier
    if use_bias:
        conv.bias.assign(rng.normal(1.0, 1.0, channels).astype(np.float32))
    bn.gamma.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))
    bn.beta.assign(rng.normal(0.0, 1.0, channels).astype(np.float32))
    bn.moving_mean.assign(rng.normal(0.5, 1.0, channels).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.5, 4.0, channels).astype(np.float32))
    return model


@cpu_only
def test_inference_after_a_depthwise_conv_is_a_scaled_filter_and_a_bias():
    # No batch-norm op and no full-size multiply remain: the normalization
    # is the convolution's filter times a and a BiasAdd, which oneDNN fuses
    # with the ReLU6 into the convolution.
    from keras_bn.backend.tensorflow import private_api as tf_private_api

    model = _depthwise_bn_relu6()
    x = tf.constant(np.random.RandomState(0).normal(size=(2, 7, 7, 4)), tf.float32)
    types = _runtime_op_types(lambda x: model(x, training=False), x)
    assert "FusedBatchNormV3" not in types and "_MklNativeFusedBatchNormV3" not in types, types
    convs = [t for t in types if "Depthwise" in t]
    assert len(convs) == 1, types
    if tf_private_api.onednn_enabled():
        assert convs[0].endswith("FusedDepthwiseConv2dNative[BiasAdd,Relu6]"), types
    else:
        assert convs[0] == "DepthwiseConv2dNative" and "BiasAdd" in types, types


@pytest.mark.parametrize("multiplier, use_bias", [(1, False), (2, True)])
@pytest.mark.parametrize("graph", [False, True])
def test_depthwise_fold_gives_the_same_outputs_and_every_gradient(multiplier, use_bias, graph):
    # A channel multiplier of 2 checks the filter's [C, m] layout; a bias
    # checks that it goes into the offset.
    model = _depthwise_bn_relu6(multiplier, use_bias)
    reference = _depthwise_bn_relu6(multiplier, use_bias, fused=False)
    reference.set_weights(model.get_weights())
    x = tf.constant(np.random.RandomState(1).normal(size=(3, 7, 7, 4)), tf.float32)
    dy = tf.constant(np.random.RandomState(2).normal(size=(3, 5, 5, 4 * multiplier)), tf.float32)

    def step(model, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
        return [y] + tape.gradient(y, [x] + model.trainable_weights, output_gradients=dy)

    run = tf.function(step) if graph else step
    for g, w in zip(run(model, x), run(reference, x)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_depthwise_fold_second_derivatives_are_exact():
    model = _depthwise_bn_relu6(2, True)
    reference = _depthwise_bn_relu6(2, True, fused=False)
    reference.set_weights(model.get_weights())
    x = tf.constant(np.random.RandomState(3).normal(size=(2, 7, 7, 4)), tf.float32)

    for g, w in zip(_d_of_gamma_gradient(model, x, ["kernel", "bias", "beta"]),
                    _d_of_gamma_gradient(reference, x, ["kernel", "bias", "beta"])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_training_and_other_producers_are_left_alone():
    # Training normalizes with the batch's statistics: nothing to fold. A
    # batch norm whose input is not a convolution's output keeps its route.
    from keras_bn.backend.tensorflow import dispatch

    routes = []

    @tf.function
    def f(x):
        conv = tf.nn.depthwise_conv2d(x, tf.ones([3, 3, 4, 1]), [1, 1, 1, 1], "VALID")
        for inputs, training in ((conv, True), (tf.nn.relu(conv), False), (conv, False)):
            routes.append(dispatch.route(inputs, 3, 1e-5, training=training).reason)
        return conv

    f(tf.zeros([2, 7, 7, 4]))
    assert "DepthwiseConv2dNative" not in routes[0] and "DepthwiseConv2dNative" not in routes[1]
    assert routes[2] == "inference of a DepthwiseConv2dNative's output in a graph: into its filter"
