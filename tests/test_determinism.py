"""Determinism: with TensorFlow's op determinism on and a fixed seed, two
training runs end with bit-identical moving statistics, on the fused
kernel and on TF ops.

`tf.config.experimental.enable_op_determinism()` holds for the rest of
the process, so the runs happen in a fresh Python process: this file run
as a script (`python -m tests.test_determinism`), which prints a JSON
report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def _train(fused, seed):
    """Two epochs of a small CNN with shuffling and dropout, both drawn from
    `seed`; returns every batch norm's moving statistics."""
    import keras

    from keras_bn import BatchNorm

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        BatchNorm(fused=fused, name="bn_conv"),
        keras.layers.ReLU(),
        keras.layers.Dropout(0.25),
        keras.layers.Flatten(),
        keras.layers.Dense(5, use_bias=False),
        BatchNorm(fused=fused, name="bn_dense"),
        keras.layers.ReLU(),
        keras.layers.Dense(3),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(0)
    x = rng.normal(0.5, 2.0, (64, 6, 6, 2)).astype(np.float32)
    y = rng.randint(0, 3, 64)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=True, verbose=0)
    return {f"{layer.name}.{w.name}": w.numpy()
            for layer in model.layers if isinstance(layer, BatchNorm)
            for w in (layer.moving_mean, layer.moving_variance)}


def _compare(a, b):
    """Keys whose arrays differ in any bit."""
    return sorted(k for k in a if a[k].tobytes() != b[k].tobytes())


def main():
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    report = {}
    for fused in (True, False):
        first, second, other_seed = _train(fused, 7), _train(fused, 7), _train(fused, 8)
        report["kernel" if fused else "tf_ops"] = {
            "differ_same_seed": _compare(first, second),
            "differ_other_seed": _compare(first, other_seed),
            "moved": sorted(k for k, v in first.items()
                            if not np.array_equal(v, np.zeros_like(v))
                            and not np.array_equal(v, np.ones_like(v))),
            "keys": sorted(first),
        }
    print("REPORT " + json.dumps(report))


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    try:
        result = subprocess.run([sys.executable, "-m", "tests.test_determinism"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:  # subprocess.run has killed it
        pytest.fail(f"the determinism runs took over {TIMEOUT_S} s: {error}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [s for s in result.stdout.splitlines() if s.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


@pytest.mark.slow
@pytest.mark.parametrize("path", ["kernel", "tf_ops"])
def test_same_seed_gives_bit_identical_moving_statistics(report, path):
    runs = report[path]
    assert runs["keys"] == ["bn_conv.moving_mean", "bn_conv.moving_variance",
                            "bn_dense.moving_mean", "bn_dense.moving_variance"]
    assert runs["moved"] == runs["keys"]  # training changed every statistic
    assert runs["differ_same_seed"] == []
    # ... and the seed matters: the check is not passed by a run that
    # ignores its randomness.
    assert runs["differ_other_seed"] == runs["keys"]


if __name__ == "__main__":
    main()
