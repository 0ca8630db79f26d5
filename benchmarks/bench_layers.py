"""Times keras_bn.BatchNorm against keras.layers.BatchNormalization.

Both layers (and tf_keras's, when installed) run in one process on the same
input, interleaved call by call so that drift in the machine's speed hits
them alike; warm-up calls (tracing, autotuning) are excluded; each figure is
the median of the repeats. Every case is also expressed in units of one
elementwise TensorFlow pass over the same tensor (`tf.negative`: one read,
one write), the memory floor that batch norm, a memory-bound op, is judged
against: about 3 passes for the training forward pass, 5 for the backward.

    python benchmarks/bench_layers.py                 # the full matrix
    python benchmarks/bench_layers.py --quick         # a smoke run
    python benchmarks/bench_layers.py --json out.json
"""

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402
import common as machine  # noqa: E402  (benchmarks/, next to this script)
from common import QUICK_SHAPES  # noqa: E402
from common import SHAPES  # noqa: E402

MODES = ("inference", "train_forward", "train_step")


def _gpu():
    return bool(tf.config.list_logical_devices("GPU"))


def _sync():
    if _gpu():
        tf.test.experimental.sync_devices()


def environment():
    """Hardware, oneDNN, versions and commit, written next to every set of
    figures."""
    from keras_bn.backend.tensorflow import dispatch

    cpu, flags = machine.cpuinfo()
    gpus = [
        tf.config.experimental.get_device_details(d).get("device_name", d.name)
        for d in tf.config.list_physical_devices("GPU")
    ]
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "onednn": dispatch.cpu_kind() == "onednn",
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
        "gpus": gpus,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_bn": keras_bn.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "git": machine.git_commit(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def _layers(dtype_name, axis, extra=None):
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16",
              "float16": "mixed_float16"}[dtype_name]
    # Equal momentum and epsilon: the two layers then compute the same thing.
    layers = {
        "keras_bn": keras_bn.BatchNorm(axis=axis, dtype=policy),
        **{name: cls(axis=axis, dtype=policy) for name, cls in (extra or {}).items()},
        "keras": keras.layers.BatchNormalization(
            axis=axis, momentum=0.9, epsilon=1e-5, dtype=policy),
    }
    try:
        import tf_keras

        tk_policy = tf_keras.mixed_precision.Policy(policy)
        layers["tf_keras"] = tf_keras.layers.BatchNormalization(
            axis=axis, momentum=0.9, epsilon=1e-5, dtype=tk_policy)
    except ImportError:
        pass
    return layers


def _step(layer, mode, jit, dy):
    if mode == "inference":
        fn = lambda x: layer(x, training=False)  # noqa: E731
    elif mode == "train_forward":
        fn = lambda x: layer(x, training=True)  # noqa: E731
    else:
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, [x] + layer.trainable_weights,
                                 output_gradients=dy)
    return tf.function(fn, jit_compile=jit)


def time_case(shape, axis, dtype_name, mode, jit, repeats, warmup, extra_layers=None,
              rotate=False):
    """Median seconds per call for each layer and for one copy pass.

    `extra_layers`: {name: a BatchNorm-like class} timed in the same loop
    (compare_revisions.py's in-process mode: another revision's layer).
    `rotate`: start each repeat with the next function, so that each takes
    each place in the loop equally often (the one right after the copy
    pass runs measurably slower: 7-20 % for the same layer timed twice).
    """
    dtype = tf.as_dtype(dtype_name)
    rng = np.random.RandomState(0)
    x = tf.cast(rng.normal(0.5, 2.0, shape).astype(np.float32), dtype)
    dy = tf.cast(rng.normal(0.0, 1.0, shape).astype(np.float32), dtype)
    fns = {}
    for name, layer in _layers(dtype_name, axis, extra_layers).items():
        layer.build(shape)
        fns[name] = _step(layer, mode, jit, dy)
    fns["copy"] = tf.function(tf.negative, jit_compile=jit)
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    _sync()
    times = {name: [] for name in fns}
    names = list(fns)
    for repeat in range(repeats):
        start_at = repeat % len(names) if rotate else 0
        for name in names[start_at:] + names[:start_at]:
            fn = fns[name]
            start = time.perf_counter()
            fn(x)
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(shapes, dtypes, jits, modes, repeats, warmup, log=print, on_row=None):
    """Times every case; the loop order puts XLA-off float32 first, so a run
    cut short by a time limit still holds the headline figures."""
    rows = []
    header = (f"{'case':<26} {'dtype':<8} {'jit':<4} {'mode':<14} "
              f"{'keras_bn ms':>11} {'keras ms':>9} {'ratio':>6} "
              f"{'bn/copy':>8} {'keras/copy':>10}")
    log(header)
    log("-" * len(header))
    for jit in jits:
        for dtype_name in dtypes:
            for case, (shape, axis) in shapes.items():
                for mode in modes:
                    t = time_case(shape, axis, dtype_name, mode, jit,
                                  repeats, warmup)
                    row = {
                        "case": case, "shape": list(shape), "axis": axis,
                        "dtype": dtype_name, "jit_compile": jit, "mode": mode,
                        "ms": {k: v * 1e3 for k, v in t.items()},
                        "ratio_to_keras": t["keras_bn"] / t["keras"],
                        "copy_units": {k: v / t["copy"] for k, v in t.items()
                                       if k != "copy"},
                    }
                    if "tf_keras" in t:
                        row["ratio_to_tf_keras"] = t["keras_bn"] / t["tf_keras"]
                    rows.append(row)
                    if on_row is not None:
                        on_row(rows)
                    log(f"{case:<26} {dtype_name:<8} {'on' if jit else 'off':<4} "
                        f"{mode:<14} {t['keras_bn'] * 1e3:>11.2f} "
                        f"{t['keras'] * 1e3:>9.2f} {row['ratio_to_keras']:>6.2f} "
                        f"{row['copy_units']['keras_bn']:>8.1f} "
                        f"{row['copy_units']['keras']:>10.1f}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few repeats: a smoke run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated; default float32,bfloat16 on CPU, "
                             "float32,bfloat16,float16 on GPU")
    parser.add_argument("--jit", default="off,on", help="off, on or off,on")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cases", default=None,
                        help="comma-separated substrings of case names to keep")
    args = parser.parse_args(argv)

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.cases:
        keep = args.cases.split(",")
        shapes = {k: v for k, v in shapes.items() if any(s in k for s in keep)}
    dtypes = (args.dtypes.split(",") if args.dtypes else
              ["float32", "bfloat16"] + (["float16"] if _gpu() else []))
    jits = [j == "on" for j in args.jit.split(",")]
    modes = args.modes.split(",")
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = 1 if args.quick else args.warmup

    env = environment()
    print(json.dumps(env))

    def write(rows):
        # Rewritten after every case: a run stopped early keeps its rows.
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "repeats": repeats,
                           "warmup": warmup, "results": rows}, f, indent=1)

    rows = run(shapes, dtypes, jits, modes, repeats, warmup, on_row=write)
    write(rows)
    return rows


if __name__ == "__main__":
    main()
