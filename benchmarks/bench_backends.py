"""Times keras_bn.BatchNorm against keras.layers.BatchNormalization on
Keras's JAX or PyTorch backend (whichever KERAS_BACKEND names).

Both layers run in one process on the same input, interleaved call by call
and rotated, so that drift in the machine's speed and the place in the
loop hit them alike; warm-up calls (compilation) are excluded; each figure
is the median of the repeats, and the ratio is keras_bn's median over
Keras's. Training is the output, its gradient with respect to the input,
gamma and beta, and the new moving statistics; inference the output. On
JAX each is one jitted function (through `stateless_call`); on PyTorch,
eager calls with autograd, as Keras's torch trainer runs them.

    KERAS_BACKEND=jax python benchmarks/bench_backends.py [--quick] [--json out.json]
    KERAS_BACKEND=torch python benchmarks/bench_backends.py [--quick] [--json out.json]
"""

import argparse
import importlib
import json
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import common as machine  # noqa: E402  (benchmarks/, next to this script)
import keras_bn  # noqa: E402
from common import QUICK_SHAPES  # noqa: E402
from common import SHAPES  # noqa: E402

BACKEND = keras.config.backend()
MODES = ("inference", "train_step")


def environment():
    cpu, flags = machine.cpuinfo()
    package = importlib.import_module(BACKEND)
    return {
        "backend": BACKEND, "cpu": cpu, "cpu_flags": flags, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), BACKEND: package.__version__,
        "keras": keras.__version__, "keras_bn": keras_bn.__version__,
        "numpy": np.__version__, "platform": platform.platform(),
        "git": machine.git_commit(), "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def _jax_step(layer, mode, dy):
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    if mode == "inference":
        fn = jax.jit(lambda x: layer.stateless_call(trainable, non_trainable, x,
                                                    training=False)[0])
        return lambda x: fn(x).block_until_ready()

    def loss(trainable, x):
        y, new = layer.stateless_call(trainable, non_trainable, x, training=True)
        return (y * dy).sum(), new

    fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    return lambda x: jax.block_until_ready(fn(trainable, x))


def _torch_step(layer, mode, dy):
    import torch

    if mode == "inference":
        def infer(x):
            with torch.no_grad():
                return layer(x, training=False)
        return infer

    def step(x):
        x = x.detach().requires_grad_(True)
        y = layer(x, training=True)
        return torch.autograd.grad(y, [x, *(v.value for v in layer.trainable_variables)],
                                   grad_outputs=dy)
    return step


def _tensor(array):
    return keras.ops.convert_to_tensor(array)


def time_case(shape, axis, mode, repeats, warmup):
    rng = np.random.RandomState(0)
    x = _tensor(rng.normal(0.5, 2.0, shape).astype(np.float32))
    dy = _tensor(rng.normal(0.0, 1.0, shape).astype(np.float32))
    make_step = _jax_step if BACKEND == "jax" else _torch_step
    fns = {}
    for name, cls in (("keras_bn", keras_bn.BatchNorm),
                      ("keras", keras.layers.BatchNormalization)):
        layer = cls(axis=axis)
        layer.build(shape)
        fns[name] = make_step(layer, mode, dy)
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    times = {name: [] for name in fns}
    names = list(fns)
    for repeat in range(repeats):
        start_at = repeat % len(names)
        for name in names[start_at:] + names[:start_at]:
            start = time.perf_counter()
            fns[name](x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats, warmup = (5, 2) if args.quick else (args.repeats, 5)
    env = environment()
    print(json.dumps(env))
    rows = []
    print(f"{'case':<26} {'mode':<11} {'keras_bn ms':>11} {'keras ms':>9} {'ratio':>6}")
    for case, (shape, axis) in shapes.items():
        for mode in MODES:
            t = time_case(shape, axis, mode, repeats, warmup)
            ratio = t["keras_bn"] / t["keras"]
            rows.append({"case": case, "mode": mode, "keras_bn_ms": 1e3 * t["keras_bn"],
                         "keras_ms": 1e3 * t["keras"], "ratio": ratio})
            print(f"{case:<26} {mode:<11} {1e3 * t['keras_bn']:>11.3f} "
                  f"{1e3 * t['keras']:>9.3f} {ratio:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
