"""Times the fused kernel against TF ops, and both against Keras's layer,
across tensor sizes: the figures behind `keras_bn.backend.tensorflow.dispatch.FUSED_FROM`.

For channels-last inputs of 2^12 to 2^23 values (conv-shaped [16, s, s, C]
and dense-shaped [P, C]), each traced in a `tf.function`: a training step
(forward and backward for a given upstream gradient) or inference, of
`keras_bn.BatchNorm(fused=True)`, `BatchNorm(fused=False)` and
`keras.layers.BatchNormalization`, interleaved call by call in alternating
order, warm-up excluded, medians of the repeats. Run it once per CPU kind:

    TF_ENABLE_ONEDNN_OPTS=1 python benchmarks/kernel_choice.py --json choice_onednn.json
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/kernel_choice.py --json choice_eigen.json
"""

import argparse
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402
from bench_layers import environment  # noqa: E402
from bench_models import interleaved  # noqa: E402

POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def shapes(quick=False):
    """(kind, shape) pairs: per channel 256 to 65536 values, 32 to 512
    channels, at most 2^23 values in all."""
    per_channel = (256, 4096) if quick else (256, 1024, 4096, 16384, 65536)
    for p in per_channel:
        for c in ((32,) if quick else (32, 128, 512)):
            if p * c > 2**23:
                continue
            side = int((p // 16) ** 0.5)
            yield "conv", (16, side, side, c)
            yield "dense", (p, c)


def _fn(layer, training, dy):
    if not training:
        return tf.function(lambda x: layer(x, training=False))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x] + layer.trainable_weights, output_gradients=dy)

    return tf.function(step)


def time_case(shape, dtype, training, repeats, warmup):
    """Median microseconds per call of keras, fused and tf_ops."""
    policy = POLICIES[dtype]
    x = tf.cast(tf.random.stateless_normal(shape, [0, 1]), dtype)
    dy = tf.cast(tf.random.stateless_normal(shape, [0, 2]), dtype)
    layers = {
        "keras": keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=policy),
        "fused": keras_bn.BatchNorm(fused=True, dtype=policy),
        "tf_ops": keras_bn.BatchNorm(fused=False, dtype=policy),
    }
    fns = {}
    for name, layer in layers.items():
        layer.build(shape)
        fns[name] = _fn(layer, training, dy)
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    seconds = interleaved({name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}, repeats)
    return {name: t * 1e6 for name, t in seconds.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four small shapes: a smoke run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="train_step,inference")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    repeats, warmup = (3, 1) if args.quick else (args.repeats, args.warmup)
    env, rows = environment(), []
    print(json.dumps(env))
    print(f"{'mode':<11} {'dtype':<9} {'shape':<20} {'values':>8} {'keras us':>9} "
          f"{'fused':>6} {'tf_ops':>6}   (ratios to Keras)")
    for mode in args.modes.split(","):
        for dtype in args.dtypes.split(","):
            for kind, shape in shapes(args.quick):
                if mode == "inference" and kind == "dense":
                    continue  # rank-2 inference always takes TF ops (foldable)
                t = time_case(shape, dtype, mode == "train_step", repeats, warmup)
                values = math.prod(shape)
                row = {"mode": mode, "dtype": dtype, "shape": list(shape), "values": values,
                       "us": t, "fused_ratio": t["fused"] / t["keras"],
                       "tf_ops_ratio": t["tf_ops"] / t["keras"]}
                rows.append(row)
                print(f"{mode:<11} {dtype:<9} {str(shape):<20} {values:>8} {t['keras']:>9.0f} "
                      f"{row['fused_ratio']:>6.2f} {row['tf_ops_ratio']:>6.2f}", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"environment": env, "repeats": repeats, "warmup": warmup,
                                   "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
