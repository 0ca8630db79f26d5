"""Measures the batch variance each kernel computes against float64: the
figures behind `fused_kernel.SUM_LIMIT`.

For channels-last batches [n / 1024, 32, 32, 4] of 2^12 to 2^20 values per
channel, three kinds of data: normal near zero, the offset data of
tests/test_offsets.py (channel means 1e6 x 1..2, standard deviations
0.1..1) and 0/1 data (p = 0.01..0.5: few distinct values, the worst case
for a float32 running sum). For each: TensorFlow's FusedBatchNormV3 called
once on the batch (on the offset data after the guard's shift, as the
layer hands it over), `BatchNorm(fused=True)` and `BatchNorm(fused=False)`,
eagerly; the largest relative error of the variance over the channels,
against the float64 variance of the same float32 values. Run it once per
CPU kind:

    TF_ENABLE_ONEDNN_OPTS=1 python benchmarks/kernel_accuracy.py --json acc_onednn.json
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/kernel_accuracy.py --json acc_eigen.json
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402
from keras_bn.backend.tensorflow import fused_kernel  # noqa: E402
from bench_layers import environment  # noqa: E402

CHANNELS = 4


def batch(data, per_channel, rng):
    shape = (per_channel // 1024, 32, 32, CHANNELS)
    if data == "binary":
        return (rng.random(shape) < np.linspace(0.01, 0.5, CHANNELS)).astype(np.float32)
    means = 1e6 * np.linspace(1.0, 2.0, CHANNELS) if data == "offset_1e6" else 0.0
    stds = np.linspace(0.1, 1.0, CHANNELS)
    return (means + stds * rng.standard_normal(shape)).astype(np.float32)


def one_call_variance(x):
    """The kernel's biased variance from one call on the whole batch, the
    batch first shifted by the mean of its first rows (exact: Sterbenz)
    as the layer's guard shifts data far from zero."""
    shift = x[:1].mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    out = tf.raw_ops.FusedBatchNormV3(
        x=x - shift, scale=tf.ones([CHANNELS]), offset=tf.zeros([CHANNELS]),
        mean=tf.zeros([0]), variance=tf.zeros([0]), epsilon=1e-5,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    return out.reserve_space_2.numpy()  # the biased variance on a CPU


def layer_variance(x, fused):
    layer = keras_bn.BatchNorm(fused=fused, momentum=0.0)
    layer(x, training=True)
    return layer.moving_variance.numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="2^12 and 2^14 values only")
    args = parser.parse_args()
    sizes = [2**12, 2**14] if args.quick else [2**k for k in range(12, 21)]
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'data':>10} {'per channel':>12} {'one call':>9} {'fused':>9} {'TF ops':>9}")
    for data in ("normal", "offset_1e6", "binary"):
        for n in sizes:
            x = batch(data, n, rng)
            want = x.astype(np.float64).var(axis=(0, 1, 2))
            errors = {name: float(np.max(np.abs(v / want - 1.0))) for name, v in (
                ("one_call", one_call_variance(x)), ("fused", layer_variance(x, True)),
                ("tf_ops", layer_variance(x, False)))}
            rows.append({"data": data, "per_channel": n, **errors})
            print(f"{data:>10} {n:>12} {errors['one_call']:9.1e} {errors['fused']:9.1e} "
                  f"{errors['tf_ops']:9.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "sum_limit":
                       fused_kernel.SUM_LIMIT, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
