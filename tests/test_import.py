"""`import keras_bn` itself (keras_bn/__init__.py): it refuses a Keras
backend other than TensorFlow's, whichever way Keras was told to pick it.

Each case imports keras_bn in a fresh interpreter, since Keras picks its
backend once per process. Every other backend needs a package this suite
doesn't: jax (which Keras's numpy backend imports too), torch or openvino.
Without it Keras fails inside its own import, before it can be asked
which backend it has; keras_bn says so in its own words.
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


def _import_error(tmp_path, backend, keras_backend=None, before=""):
    """The last line of stderr of `import keras_bn` (after `before`), with
    keras.json naming `backend` in a fresh KERAS_HOME, and KERAS_BACKEND
    unset unless given."""
    (tmp_path / "keras.json").write_text(json.dumps({"backend": backend}))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if keras_backend is not None:
        env["KERAS_BACKEND"] = keras_backend
    result = subprocess.run([sys.executable, "-c", f"{before}import keras_bn"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout + result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed: Keras can't start its "
                    "jax backend to say it has it (the next test covers that case)")
def test_keras_json_naming_jax_fails_with_keras_bn_message(tmp_path):
    assert _import_error(tmp_path, "jax") == (
        "ImportError: keras_bn needs the TensorFlow backend of Keras; received "
        '"backend": "jax" in keras.json (under KERAS_HOME, ~/.keras by default). '
        'Set "backend": "tensorflow" there, or KERAS_BACKEND=tensorflow.')


@pytest.mark.skipif(HAS_JAX, reason="jax is installed: Keras starts its jax backend")
def test_keras_json_naming_jax_without_jax_fails_with_keras_bn_message(tmp_path):
    assert _import_error(tmp_path, "jax") == (
        "ImportError: keras_bn needs the TensorFlow backend of Keras; received "
        "another backend in keras.json (under KERAS_HOME, ~/.keras by default), "
        "which Keras failed to start (No module named 'jax'). Set \"backend\": "
        '"tensorflow" there, or KERAS_BACKEND=tensorflow.')


def test_the_check_asks_keras_which_backend_it_started(tmp_path):
    # Keras started on TensorFlow, then made to answer "jax": without jax
    # installed, the one way to reach the check after Keras has started. It
    # raises on Keras's answer alone, KERAS_BACKEND unset, and so blames
    # keras.json, the other place Keras reads.
    assert _import_error(tmp_path, "tensorflow", before=(
        "import keras; keras.config.backend = lambda: 'jax'; ")) == (
        "ImportError: keras_bn needs the TensorFlow backend of Keras; received "
        '"backend": "jax" in keras.json (under KERAS_HOME, ~/.keras by default). '
        'Set "backend": "tensorflow" there, or KERAS_BACKEND=tensorflow.')


def test_keras_backend_naming_jax_fails_with_keras_bn_message(tmp_path):
    # KERAS_BACKEND wins over keras.json, as in Keras; the same message
    # whether or not jax is installed.
    assert _import_error(tmp_path, "tensorflow", keras_backend="jax") == (
        "ImportError: keras_bn needs the TensorFlow backend of Keras; received "
        "KERAS_BACKEND='jax'. Unset it or set KERAS_BACKEND=tensorflow.")
