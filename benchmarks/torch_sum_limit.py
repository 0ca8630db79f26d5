"""What measuring large batches in groups costs on PyTorch, and what it buys.

torch's channels-last and 2-D batch-norm kernels sum in float32, so keras_bn
measures a batch of more than `native_kernel.SUM_LIMIT` values per channel
in groups (docs/backends.md). This times the layer's eager train step (the
output and its gradient with respect to the input, gamma and beta, as
Keras's torch trainer runs it) with the groups and with one kernel call
(SUM_LIMIT set beyond any batch), and Keras's layer, interleaved call by
call in alternating order, warm-up excluded, medians; and the largest
relative error of the variance of 0/1 data over the channels, against
float64, both ways.

    KERAS_BACKEND=torch python benchmarks/torch_sum_limit.py [--quick] [--json out.json]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402
from bench_backends import _torch_step  # noqa: E402
from bench_backends import environment  # noqa: E402

SHAPES = [(64, 32, 32, 64), (32, 56, 56, 128), (4096, 256), (16384, 64), (256, 64)]
QUICK_SHAPES = [(8, 16, 16, 8), (4100, 8), (64, 8)]
ONE_CALL = 2**62


def _layer(cls, shape):
    layer = cls(momentum=0.0)
    layer.build(shape)
    return layer


def variance_error(shape, limit):
    from keras_bn.backend.torch import native_kernel

    rng = np.random.default_rng(0)
    x = (rng.random(shape) < np.linspace(0.01, 0.5, shape[-1])).astype(np.float32)
    x.reshape(-1, shape[-1])[0] = 1.0  # no channel without a 1 (variance 0) in a small batch
    native_kernel.SUM_LIMIT = limit
    layer = _layer(keras_bn.BatchNorm, shape)
    layer(keras.ops.convert_to_tensor(x), training=True)
    want = x.astype(np.float64).var(axis=tuple(range(x.ndim - 1)))
    native_kernel.SUM_LIMIT = 2048
    return float(np.max(np.abs(keras.ops.convert_to_numpy(layer.moving_variance) / want - 1)))


def time_shape(shape, repeats, warmup):
    import torch

    from keras_bn.backend.torch import native_kernel

    x = torch.randn(shape)
    dy = torch.randn(shape)
    ours = _torch_step(_layer(keras_bn.BatchNorm, shape), "train_step", dy)
    steps = {"grouped": (2048, ours), "one_call": (ONE_CALL, ours),
             "keras": (None, _torch_step(_layer(keras.layers.BatchNormalization, shape),
                                         "train_step", dy))}
    times = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            limit, step = steps[name]
            if limit is not None:
                native_kernel.SUM_LIMIT = limit
            start = time.perf_counter()
            step(x)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    native_kernel.SUM_LIMIT = 2048
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if keras.config.backend() != "torch":
        parser.error(f"needs KERAS_BACKEND=torch; Keras runs {keras.config.backend()}")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    rows = []
    print(f"{'shape':>18} {'grouped ms':>10} {'one call':>9} {'keras':>8} {'ratio':>6} "
          f"{'var err grouped':>15} {'one call':>9}")
    for shape in shapes:
        ms = time_shape(shape, repeats, 1 if args.quick else args.warmup)
        errors = {"grouped": variance_error(shape, 2048),
                  "one_call": variance_error(shape, ONE_CALL)}
        ratio = ms["grouped"] / ms["one_call"]
        rows.append({"shape": list(shape), "ms": ms, "grouped_over_one_call": ratio,
                     "variance_error": errors})
        print(f"{'x'.join(map(str, shape)):>18} {ms['grouped']:10.2f} {ms['one_call']:9.2f} "
              f"{ms['keras']:8.2f} {ratio:6.3f} {errors['grouped']:15.1e} "
              f"{errors['one_call']:9.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "repeats": repeats, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
