"""SavedModel export: signatures, serving without keras_bn, TensorFlow's own
saved_model_cli, inference mode, no state change, concurrent serving."""

import concurrent.futures
import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.model_helpers import images
from tests.model_helpers import serve_without_keras_bn
from tests.model_helpers import serving_cnn

# The served graph is the float32 graph `predict` runs; Grappler may fuse
# its ops differently (Conv2D + BiasAdd + ReLU), which moves a few ulps of
# O(1-10) logits.
SERVE_TOL = 1e-5
BATCH_SIZES = (1, 3, 8)
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
_STATE_WRITES = {"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model with trained-looking batch norms, exported both ways, and
    what `predict` returns for each batch size."""
    keras.utils.set_random_seed(0)
    model = serving_cnn()
    root = tmp_path_factory.mktemp("export")
    paths = {"export": str(root / "export"), "tf_saved_model": str(root / "tf_saved_model")}
    model.export(paths["export"], verbose=False)
    tf.saved_model.save(model, paths["tf_saved_model"])
    inputs = {n: images(n, seed=n) for n in BATCH_SIZES}
    expected = {n: model.predict(x, verbose=0) for n, x in inputs.items()}
    return model, paths, inputs, expected


@pytest.fixture(scope="module", params=["export", "tf_saved_model"])
def served(request, exported):
    """(loaded SavedModel, its serving_default function, input name, how
    it was saved); `loaded` owns the variables and must outlive the calls."""
    loaded = tf.saved_model.load(exported[1][request.param])
    serve = loaded.signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    return loaded, serve, name, request.param


def _serve(served, x):
    _, serve, name, _ = served
    (y,) = serve(**{name: tf.constant(x)}).values()
    return y.numpy()


def _ops(concrete_function):
    """Op types of a function's graph and of every function it calls."""
    graph_def = concrete_function.graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def test_serving_default_has_a_dynamic_batch_dimension(served):
    _, serve, name, saved_by = served
    (spec,) = serve.structured_input_signature[1].values()
    # model.export names the input after the keras.Input; tf.saved_model.save
    # after the argument of Model.call.
    assert name == {"export": "image", "tf_saved_model": "inputs"}[saved_by]
    assert spec.shape.as_list() == [None, 8, 8, 3]
    assert spec.dtype == tf.float32
    (output,) = serve.structured_outputs.values()
    assert output.shape.as_list() == [None, 4]


def test_serving_reproduces_predict_at_several_batch_sizes(served, exported):
    _, _, inputs, expected = exported
    for n in BATCH_SIZES:
        np.testing.assert_allclose(_serve(served, inputs[n]), expected[n],
                                   atol=SERVE_TOL, rtol=SERVE_TOL)


def test_serving_runs_in_inference_mode(served, exported):
    # With moving statistics a row's answer does not depend on the rest of
    # the batch; with batch statistics it would.
    x = exported[2][8]
    batch = _serve(served, x)
    for i in range(len(x)):
        np.testing.assert_allclose(_serve(served, x[i:i + 1])[0], batch[i],
                                   atol=SERVE_TOL, rtol=SERVE_TOL)


def test_serving_never_changes_state(served, exported):
    serve = served[1]
    assert "Conv2D" in _ops(serve)  # the callees' bodies are in the scan
    assert not _ops(serve) & _STATE_WRITES
    before = [v.numpy().copy() for v in serve.variables]
    assert len(before) == len(exported[0].weights)
    for n in BATCH_SIZES:
        _serve(served, exported[2][n])
    for b, v in zip(before, serve.variables):
        np.testing.assert_array_equal(v.numpy(), b)


def test_eight_threads_get_identical_results(served):
    xs = [images(1 + i % 4, seed=100 + i) for i in range(8)]
    want = [_serve(served, x) for x in xs]
    start = threading.Barrier(8)

    def worker(i):
        start.wait()  # all eight call at once
        return [_serve(served, xs[i]) for _ in range(10)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    for i, runs in enumerate(results):
        for y in runs:
            np.testing.assert_array_equal(y, want[i])


@pytest.mark.slow
def test_a_process_without_keras_bn_serves_it(exported, tmp_path):
    _, paths, inputs, expected = exported
    directories = [paths["export"], paths["tf_saved_model"]]
    outputs = serve_without_keras_bn(
        tmp_path, directories, {str(n): x for n, x in inputs.items()})
    for served in outputs:
        for n in BATCH_SIZES:
            np.testing.assert_allclose(served[str(n)], expected[n],
                                       atol=SERVE_TOL, rtol=SERVE_TOL)


def _saved_model_cli(*args):
    assert os.path.isfile(SAVED_MODEL_CLI), f"no saved_model_cli next to {sys.executable}"
    result = subprocess.run(
        [SAVED_MODEL_CLI, *args], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_saved_model_cli_show_all(exported):
    shown = _saved_model_cli("show", "--dir", exported[1]["export"], "--all")
    serving_default = shown.split("signature_def['serving_default']:")[1]
    for line in [
        "inputs['image'] tensor_info:",
        "dtype: DT_FLOAT",
        "shape: (-1, 8, 8, 3)",
        "outputs['output_0'] tensor_info:",
        "shape: (-1, 4)",
        "Method name is: tensorflow/serving/predict",
    ]:
        assert line in serving_default, shown


@pytest.mark.slow
def test_saved_model_cli_run(exported, tmp_path):
    _, paths, inputs, expected = exported
    np.save(tmp_path / "x.npy", inputs[3])
    _saved_model_cli(
        "run", "--dir", paths["export"], "--tag_set", "serve",
        "--signature_def", "serving_default",
        "--inputs", f"image={tmp_path / 'x.npy'}", "--outdir", str(tmp_path / "out"),
    )
    np.testing.assert_allclose(np.load(tmp_path / "out" / "output_0.npy"), expected[3],
                               atol=SERVE_TOL, rtol=SERVE_TOL)
