"""`import keras_bn` itself (keras_bn/__init__.py): it runs on Keras's
TensorFlow, JAX and PyTorch backends, refuses the others whichever way
Keras was told to pick them, and on JAX or PyTorch needs no TensorFlow.

Each case imports keras_bn in a fresh interpreter, since Keras picks its
backend once per process. A backend whose package is missing (jax, torch)
makes Keras fail inside its own import, before it can be asked which
backend it has; keras_bn says so in its own words. This module runs under
every backend's suite.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_JAX = importlib.util.find_spec("jax") is not None

pytestmark = pytest.mark.slow


def _run(tmp_path, backend, keras_backend=None, code="import keras_bn"):
    """`code` in a fresh interpreter, with keras.json naming `backend` in a
    fresh KERAS_HOME, and KERAS_BACKEND unset unless given."""
    (tmp_path / "keras.json").write_text(json.dumps({"backend": backend}))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if keras_backend is not None:
        env["KERAS_BACKEND"] = keras_backend
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _import_error(tmp_path, backend, keras_backend=None, before=""):
    """The last line of stderr of a failing `import keras_bn`."""
    result = _run(tmp_path, backend, keras_backend, f"{before}import keras_bn")
    assert result.returncode != 0, result.stdout + result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed here")
def test_keras_json_naming_jax_imports_without_tensorflow(tmp_path):
    # Keras's jax backend imports no TensorFlow, and neither does keras_bn.
    result = _run(tmp_path, "jax", code=(
        "import sys, keras_bn; from keras_bn import backend; "
        "print(backend.NAME, 'tensorflow' in sys.modules)"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["jax", "False"]


@pytest.mark.skipif(HAS_JAX, reason="jax is installed: Keras starts its jax backend")
def test_keras_json_naming_jax_without_jax_says_to_install_it(tmp_path):
    assert _import_error(tmp_path, "jax") == (
        "ImportError: keras_bn: Keras could not start its backend; received "
        "another backend in keras.json (under KERAS_HOME, ~/.keras by default), "
        "which Keras failed to start (No module named 'jax'). For keras_bn on "
        "JAX, `pip install jax` (in a clone of keras_bn, `pip install -e '.[jax]'`).")


@pytest.mark.skipif(importlib.util.find_spec("openvino") is not None,
                    reason="openvino is installed: Keras starts its openvino backend")
def test_keras_backend_naming_openvino_fails_with_keras_bn_message(tmp_path):
    # KERAS_BACKEND wins over keras.json, as in Keras.
    assert _import_error(tmp_path, "tensorflow", keras_backend="openvino") == (
        "ImportError: keras_bn runs on the TensorFlow, JAX and PyTorch backends of "
        "Keras; received KERAS_BACKEND='openvino'. Set KERAS_BACKEND to "
        "tensorflow, jax or torch.")


def test_the_check_asks_keras_which_backend_it_started(tmp_path):
    # Keras started on this environment's backend, then made to answer
    # "numpy" (which needs jax to start): the one way to reach the check
    # after Keras has started. It raises on Keras's answer alone,
    # KERAS_BACKEND unset, and so blames keras.json, the other place Keras
    # reads.
    started = os.environ.get("KERAS_BACKEND", "tensorflow")
    assert _import_error(tmp_path, started, before=(
        "import keras; keras.config.backend = lambda: 'numpy'; ")) == (
        "ImportError: keras_bn runs on the TensorFlow, JAX and PyTorch backends of "
        'Keras; received "backend": "numpy" in keras.json (under KERAS_HOME, '
        '~/.keras by default). Set "backend": "tensorflow", "jax" or "torch" '
        "there, or KERAS_BACKEND.")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed: Keras starts its TensorFlow backend")
def test_tensorflow_backend_without_tensorflow_says_to_install_it_or_another(tmp_path):
    assert _import_error(tmp_path, "tensorflow") == (
        "ImportError: keras_bn on Keras's TensorFlow backend needs TensorFlow, "
        "which is not installed: `pip install tensorflow` (or, on Linux, "
        "`tensorflow-cpu`, the smaller CPU-only wheel, or 'tensorflow[and-cuda]' "
        "for NVIDIA GPUs). In a clone of keras_bn, `pip install -e '.[cpu]'` "
        "installs it with the package. For JAX or PyTorch, set KERAS_BACKEND=jax "
        "or torch.")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed: Keras starts its torch backend")
def test_keras_backend_naming_torch_without_torch_says_to_install_it(tmp_path):
    assert _import_error(tmp_path, "tensorflow", keras_backend="torch") == (
        "ImportError: keras_bn: Keras could not start its backend; received "
        "KERAS_BACKEND='torch'. For keras_bn on PyTorch, `pip install torch` (in "
        "a clone of keras_bn, `pip install -e '.[torch]'`).")
