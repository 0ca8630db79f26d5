"""Times inference of a small CNN with its batch norms folded and unfolded.

The model is three Conv2D -> keras_bn.BatchNorm -> ReLU blocks, global
pooling and a Dense head, on 32x32x3 images; its batch norms get random
moving statistics. `keras_bn.fold_batch_norms` gives the folded copy. Both run
as `tf.function`s in inference mode (what a SavedModel serves) in one
process, interleaved round by round in alternating order so that drift in
the machine's speed hits them alike; warm-up calls (tracing, autotuning) are
excluded; each figure is the median over the rounds of the mean time per call
within a round. Before timing, the two models' outputs are checked to agree.

    python benchmarks/fold_benchmark.py                  # batch 1 and 64
    python benchmarks/fold_benchmark.py --quick          # a smoke run
    python benchmarks/fold_benchmark.py --json out.json  # also write results
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402


def environment():
    """Hardware and versions, written next to the figures."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True,
            text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "keras_bn": f"{keras_bn.__version__} (git {commit})",
        # Other work on the machine shows up in the figures: say how much.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def small_cnn(filters=(32, 64, 128)):
    layers = [keras.Input((32, 32, 3))]
    for i, f in enumerate(filters):
        layers += [
            keras.layers.Conv2D(f, 3, padding="same", use_bias=False),
            keras_bn.BatchNorm(),
            keras.layers.ReLU(),
        ]
        if i < len(filters) - 1:
            layers.append(keras.layers.MaxPooling2D())
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    rng = np.random.RandomState(0)
    for layer in model.layers:
        if isinstance(layer, keras_bn.BatchNorm):
            c = layer.moving_mean.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 2.0, c), rng.uniform(-1.0, 1.0, c),
                rng.uniform(-1.0, 1.0, c), rng.uniform(0.5, 2.0, c),
            ])
    return model


def time_batch(models, batch, rounds, calls, warmup):
    """Median seconds per call for each model on one batch size."""
    x = tf.constant(np.random.RandomState(1).normal(0.0, 1.0, (batch, 32, 32, 3)),
                    tf.float32)
    fns = {name: tf.function(lambda x, m=m: m(x, training=False))
           for name, m in models.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn(x).numpy()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(calls):
                y = fns[name](x)
            y.numpy()  # waits for the last call
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=20, help="calls per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.warmup = 3, 2, 2

    keras.utils.set_random_seed(0)
    unfolded = small_cnn()
    folded = keras_bn.fold_batch_norms(unfolded)
    x = np.random.RandomState(2).normal(0.0, 1.0, (8, 32, 32, 3)).astype(np.float32)
    diff = float(np.abs(folded(x) - unfolded(x, training=False)).max())
    if diff > 1e-3:  # float32 logits of O(10), rounded in other places
        raise SystemExit(f"folded and unfolded outputs differ by {diff}")

    env = environment()
    for key, value in env.items():
        print(f"{key}: {value}")
    print(f"layers: {len(unfolded.layers)} unfolded, {len(folded.layers)} folded; "
          f"max |output difference| {diff:.1e}")
    print(f"{args.rounds} rounds x {args.calls} calls, {args.warmup} warm-up calls\n")
    print("| batch | unfolded ms | folded ms | speed-up | folded images/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        t = time_batch({"unfolded": unfolded, "folded": folded}, batch,
                       args.rounds, args.calls, args.warmup)
        speedup = t["unfolded"] / t["folded"]
        results.append({"batch": batch, "unfolded_ms": t["unfolded"] * 1e3,
                        "folded_ms": t["folded"] * 1e3, "speedup": speedup})
        print(f"| {batch} | {t['unfolded'] * 1e3:.3f} | {t['folded'] * 1e3:.3f} | "
              f"{speedup:.2f}x | {batch / t['folded']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rounds": args.rounds, "calls": args.calls,
                       "warmup": args.warmup, "max_output_difference": diff,
                       "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
